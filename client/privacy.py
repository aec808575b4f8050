"""The site's differential-privacy gate and its privacy ledger.

When a run sets ``dp-noise-multiplier > 0`` every site clips its update and adds Gaussian
noise (:mod:`fedrad.common.dp`) before the weights leave it.  The site, not the coordinator,
keeps the account: a JSON *privacy ledger* (default ``<data-dir>/privacy-ledger.json``,
``--node-config "privacy-ledger=/path/ledger.json"`` to move it) lists every DP release with
its run, round, noise multiplier, clip, delta and the epsilon spent: for the round, for the run
so far and in total over all runs.  Site options, from the SuperNode's node config (set by
hospital IT, so a coordinator cannot change them):

``privacy-budget=<epsilon>``
    The site's total budget.  A round that would take the total above it is refused with
    ``privacy-budget-exceeded``, and a round without DP is refused with
    ``privacy-dp-required``.  Without a budget DP rounds are still recorded.
``privacy-ledger=<file>``
    Where the ledger lives.
``privacy-neighbouring=add-remove|replace``
    The neighbouring relation accounted (see :mod:`fedrad.common.dp`): ``add-remove``
    (default; sensitivity = clip, the DP-FedAvg convention) or ``replace`` (sensitivity =
    2 x clip; covers any change of the site's data, and costs more epsilon).

Accounting: epsilons are recomputed from the ledger's entries by the RDP accountant on every
round (the stored cumulative numbers are for reading); the per-run epsilon is at the run's
delta, the total at the smallest delta in the ledger (the conservative choice: a coordinator
cannot lower the total by asking for a large delta).

Order of events: the budget is checked before training (to save the work) and again, under a
file lock, after the noisy update is made; the spend is then written, *before* the update is
handed to Flower to send.  A crash between the two leaves a spend recorded for an update that
never left (conservative); the reverse, an update sent but not recorded, cannot happen.  A
round that is retried releases a new update and is charged again.

Writes are atomic (temporary file, fsync, ``os.replace``): a crash leaves either the old or the
new ledger, never a torn one.  A ledger that cannot be read is an error, never a silent reset.
Concurrent runs at one site are serialised by an exclusive ``flock`` on ``<ledger>.lock``;
this holds between processes on one host (the SuperNode's ClientApp processes) but not across
hosts sharing a network file system: give each SuperNode its own ledger.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fedrad.common.config import Settings
from fedrad.common.dp import NEIGHBOURING_RELATIONS, GaussianRound, RdpAccountant, privatize_state
from fedrad.common.errors import ConfigError, FedradError

__all__ = [
    "LEDGER_FILE",
    "NODE_PRIVACY_BUDGET",
    "NODE_PRIVACY_LEDGER",
    "NODE_PRIVACY_NEIGHBOURING",
    "LedgerEntry",
    "PrivacyLedger",
    "SitePrivacy",
    "Spend",
    "check_privacy_budget",
    "ledger_text",
    "privatize_update",
]

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
LEDGER_FORMAT = "fedrad-privacy-ledger"
LEDGER_VERSION = 1
NODE_PRIVACY_BUDGET = "privacy-budget"
NODE_PRIVACY_LEDGER = "privacy-ledger"
NODE_PRIVACY_NEIGHBOURING = "privacy-neighbouring"

State = Mapping[str, torch.Tensor]


class _Site(Protocol):
    site_id: str
    data_dir: Path


@dataclass(frozen=True)
class SitePrivacy:
    """A site's own privacy options (from its node config)."""

    budget: float | None = None
    ledger: Path | None = None
    neighbouring: str = "add-remove"

    def __post_init__(self) -> None:
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise ConfigError(
                f"node config '{NODE_PRIVACY_BUDGET}' must be a finite epsilon > 0, got "
                f"{self.budget!r}; e.g. --node-config \"{NODE_PRIVACY_BUDGET}=8\"",
                code="bad-node-config")
        if self.neighbouring not in NEIGHBOURING_RELATIONS:
            raise ConfigError(
                f"node config '{NODE_PRIVACY_NEIGHBOURING}' must be one of "
                f"{', '.join(NEIGHBOURING_RELATIONS)}, got {self.neighbouring!r}",
                code="bad-node-config")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePrivacy:
        """Read ``privacy-budget``, ``privacy-ledger`` and ``privacy-neighbouring``."""
        budget: float | None = None
        raw = node_config.get(NODE_PRIVACY_BUDGET)
        if raw is not None and str(raw).strip() != "":
            try:
                budget = float(raw)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"node config '{NODE_PRIVACY_BUDGET}' must be a number (an epsilon), got "
                    f"{raw!r}; e.g. --node-config \"{NODE_PRIVACY_BUDGET}=8\"",
                    code="bad-node-config") from None
        ledger = node_config.get(NODE_PRIVACY_LEDGER)
        return cls(
            budget=budget,
            ledger=Path(str(ledger)) if ledger not in (None, "") else None,
            neighbouring=str(node_config.get(NODE_PRIVACY_NEIGHBOURING, "add-remove")),
        )

    def ledger_path(self, data_dir: Path) -> Path:
        return self.ledger if self.ledger is not None else Path(data_dir) / LEDGER_FILE


@dataclass(frozen=True)
class LedgerEntry:
    """One DP release of one site, as the ledger keeps it."""

    run_id: str
    server_round: int
    time: str
    noise_multiplier: float
    clip: float
    delta: float
    neighbouring: str
    epsilon_round: float
    epsilon_run: float
    epsilon_total: float
    delta_total: float

    def release(self) -> GaussianRound:
        return GaussianRound(self.noise_multiplier, NEIGHBOURING_RELATIONS[self.neighbouring])

    def to_json(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, raw: Any) -> LedgerEntry:
        if not isinstance(raw, dict):
            raise ValueError(f"an entry is {type(raw).__name__}, not an object")
        names = {f.replace("_", "-"): f for f in cls.__dataclass_fields__}
        missing = sorted(set(names) - set(raw))
        if missing:
            raise ValueError(f"an entry lacks {', '.join(missing)}")
        values: dict[str, Any] = {}
        for key, name in names.items():
            value = raw[key]
            if name in ("run_id", "time", "neighbouring"):
                if not isinstance(value, str):
                    raise ValueError(f"'{key}' is not a string")
            elif name == "server_round":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"'{key}' is not a round number")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not math.isfinite(value) or value < 0:
                    raise ValueError(f"'{key}' is not a finite number >= 0")
                value = float(value)
            values[name] = value
        if values["neighbouring"] not in NEIGHBOURING_RELATIONS:
            raise ValueError(f"unknown neighbouring relation {values['neighbouring']!r}")
        if values["noise_multiplier"] <= 0 or values["clip"] <= 0:
            raise ValueError("'noise-multiplier' and 'clip' must be > 0")
        if not 0 < values["delta"] < 1:
            raise ValueError("'delta' is not in (0, 1)")
        return cls(**values)


@dataclass(frozen=True)
class Spend:
    """The epsilons a release would bring: for the round, the run so far, and in total."""

    epsilon_round: float
    epsilon_run: float
    epsilon_total: float
    delta_total: float


def project_spend(entries: list[LedgerEntry], run_id: str, release: GaussianRound,
                  delta: float) -> Spend:
    """Epsilons after adding ``release`` (at ``delta``) to ``entries``."""
    this_round = RdpAccountant(rounds=[release])
    run = RdpAccountant(rounds=[e.release() for e in entries if e.run_id == run_id] + [release])
    run_delta = min([e.delta for e in entries if e.run_id == run_id] + [delta])
    total = RdpAccountant(rounds=[e.release() for e in entries] + [release])
    total_delta = min([e.delta for e in entries] + [delta])
    return Spend(this_round.epsilon(delta), run.epsilon(run_delta),
                 total.epsilon(total_delta), total_delta)


class PrivacyLedger:
    """The JSON privacy ledger of one site."""

    def __init__(self, path: Path | str, *, site_id: str = "") -> None:
        self.path = Path(path)
        self.site_id = site_id

    def _corrupt(self, why: str) -> FedradError:
        return FedradError(
            "privacy-ledger-corrupt",
            f"site {self.site_id or '(unnamed)'} cannot read its privacy ledger ({why}), so it "
            "cannot account for epsilon already spent and refuses DP rounds. The ledger is "
            "never reset automatically: restore it from a backup; start a new one only if "
            "you accept losing the record of past spending.",
            local_detail=f"ledger file: {self.path}",
        )

    def entries(self) -> list[LedgerEntry]:
        """All entries; ``[]`` when the ledger does not exist yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise FedradError(
                "privacy-ledger-unreadable",
                f"site {self.site_id or '(unnamed)'} cannot open its privacy ledger "
                f"({type(e).__name__}); check the file's permissions",
                local_detail=f"ledger file: {self.path}: {e}") from e
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise self._corrupt(f"not valid JSON at line {e.lineno}") from e
        if not isinstance(raw, dict) or raw.get("format") != LEDGER_FORMAT:
            raise self._corrupt("not a fedrad privacy ledger")
        if raw.get("version") != LEDGER_VERSION:
            raise self._corrupt(f"unknown version {raw.get('version')!r}")
        if not isinstance(raw.get("entries"), list):
            raise self._corrupt("no list of entries")
        out = []
        for i, item in enumerate(raw["entries"]):
            try:
                out.append(LedgerEntry.from_json(item))
            except ValueError as e:
                raise self._corrupt(f"entry {i + 1}: {e}") from e
        return out

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on ``<ledger>.lock`` (between processes on this host)."""
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise self._unwritable(e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _unwritable(self, err: OSError) -> FedradError:
        return FedradError(
            "privacy-ledger-unwritable",
            f"site {self.site_id or '(unnamed)'} cannot write its privacy ledger "
            f"({type(err).__name__}), so it sends no DP update; make the ledger's folder "
            "writable with free space, or move the ledger with --node-config "
            f"\"{NODE_PRIVACY_LEDGER}=<file>\" (keeping its entries)",
            local_detail=f"ledger file: {self.path}: {err}",
        )

    def write(self, entries: list[LedgerEntry]) -> None:
        """Replace the ledger with ``entries`` atomically (temp file, fsync, os.replace).

        A failure leaves the previous ledger as it was and raises ``privacy-ledger-unwritable``.
        """
        try:
            self._write(entries)
        except OSError as e:
            raise self._unwritable(e) from e

    def _write(self, entries: list[LedgerEntry]) -> None:
        doc = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "site-id": self.site_id,
               "entries": [e.to_json() for e in entries]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                   dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _site_privacy(site: _Site) -> SitePrivacy:
    privacy = getattr(site, "privacy", None)
    return privacy if isinstance(privacy, SitePrivacy) else SitePrivacy()


def _site_name(site: _Site) -> str:
    return str(getattr(site, "safe_id", site.site_id))


def _refusal(site: _Site, server_round: int, spend: Spend, spent: float, budget: float,
             settings: Settings) -> FedradError:
    return FedradError(
        "privacy-budget-exceeded",
        f"site {_site_name(site)} refuses round {server_round}: it would spend epsilon "
        f"{spend.epsilon_round:.3g} (dp-noise-multiplier={settings.dp_noise_multiplier:g}, "
        f"delta={settings.dp_delta:g}) and bring its total to {spend.epsilon_total:.3g}, above "
        f"its privacy budget of {budget:g} (already spent {spent:.3g}). The coordinator can "
        "use a larger dp-noise-multiplier or fewer rounds; only the site can raise its "
        f"budget, locally: restart its SuperNode with --node-config "
        f"\"{NODE_PRIVACY_BUDGET}=<epsilon>\"",
    )


def _check(entries: list[LedgerEntry], settings: Settings, site: _Site, run_id: str,
           server_round: int) -> Spend | None:
    """The spend of this round, or ``None`` without DP; raises when the site refuses."""
    privacy = _site_privacy(site)
    if settings.dp_noise_multiplier == 0:
        if privacy.budget is not None:
            raise FedradError(
                "privacy-dp-required",
                f"site {_site_name(site)} has a privacy budget and takes part only in "
                f"differentially private rounds; round {server_round} has "
                "dp-noise-multiplier=0. Start the run with dp-noise-multiplier > 0 "
                "(e.g. --run-config \"dp-noise-multiplier=1.0\")",
            )
        return None
    release = GaussianRound(settings.dp_noise_multiplier,
                            NEIGHBOURING_RELATIONS[privacy.neighbouring])
    spend = project_spend(entries, run_id, release, settings.dp_delta)
    if privacy.budget is not None and spend.epsilon_total > privacy.budget:
        spent = RdpAccountant(rounds=[e.release() for e in entries]).epsilon(
            min([e.delta for e in entries] + [settings.dp_delta]))
        raise _refusal(site, server_round, spend, spent, privacy.budget, settings)
    return spend


def check_privacy_budget(settings: Settings, site: _Site, run_id: int | str,
                         server_round: int) -> None:
    """Refuse, before any training, a round the site would refuse after it."""
    privacy = _site_privacy(site)
    if settings.dp_noise_multiplier == 0 and privacy.budget is None:
        return
    ledger = PrivacyLedger(privacy.ledger_path(site.data_dir), site_id=_site_name(site))
    _check(ledger.entries(), settings, site, str(run_id), server_round)


def privatize_update(
    global_state: State | Callable[[], State], new_state: State, settings: Settings,
    site: _Site, run_id: int | str, server_round: int,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Clip and noise the site's update, check the budget, record the spend.

    ``global_state`` (the weights the site received; may be a callable that returns them,
    so that runs without DP do not copy the model) and ``new_state`` (after training).
    Returns the state to send and the metrics to add: ``dp-epsilon-round`` and
    ``dp-epsilon-run`` (never the budget nor the site's total).  Without DP and without a
    budget, returns ``new_state`` unchanged and no metrics.
    """
    privacy = _site_privacy(site)
    if settings.dp_noise_multiplier == 0 and privacy.budget is None:
        return dict(new_state), {}
    run = str(run_id)
    ledger = PrivacyLedger(privacy.ledger_path(site.data_dir), site_id=_site_name(site))
    with ledger.locked():
        entries = ledger.entries()
        spend = _check(entries, settings, site, run, server_round)
        if spend is None:  # DP off (a site with a budget has refused in _check)
            return dict(new_state), {}
        received = global_state() if callable(global_state) else global_state
        release = privatize_state(received, new_state, clip=settings.dp_clip,
                                  noise_multiplier=settings.dp_noise_multiplier)
        entry = LedgerEntry(
            run_id=run, server_round=int(server_round),
            time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            noise_multiplier=settings.dp_noise_multiplier, clip=settings.dp_clip,
            delta=settings.dp_delta, neighbouring=privacy.neighbouring,
            epsilon_round=spend.epsilon_round, epsilon_run=spend.epsilon_run,
            epsilon_total=spend.epsilon_total, delta_total=spend.delta_total,
        )
        ledger.write([*entries, entry])
    log.info(
        "site %s round %d: DP update (norm %.4g, %s to %g, noise std %.4g); epsilon %.4g this "
        "round, %.4g this run, %.4g in total (delta %g)%s",
        _site_name(site), server_round, release.norm,
        "clipped" if release.clipped else "within", settings.dp_clip, release.noise_std,
        spend.epsilon_round, spend.epsilon_run, spend.epsilon_total, spend.delta_total,
        f", budget {privacy.budget:g}" if privacy.budget is not None else "",
    )
    return release.state, {"dp-epsilon-round": spend.epsilon_round,
                           "dp-epsilon-run": spend.epsilon_run}


def ledger_text(path: Path | str, *, budget: float | None = None) -> str:
    """The ledger as a table for hospital IT, with per-run and total epsilon."""
    ledger = PrivacyLedger(path)
    entries = ledger.entries()
    if not entries:
        return f"privacy ledger {ledger.path}: no differentially private round recorded"
    header = ("run", "round", "time (UTC)", "sigma", "clip", "delta", "relation",
              "eps round", "eps run", "eps total")
    rows = [(e.run_id, str(e.server_round), e.time, f"{e.noise_multiplier:g}", f"{e.clip:g}",
             f"{e.delta:g}", e.neighbouring, f"{e.epsilon_round:.4g}", f"{e.epsilon_run:.4g}",
             f"{e.epsilon_total:.4g}") for e in entries]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"privacy ledger {ledger.path}: {len(entries)} DP rounds", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in [header, *rows]]
    lines.append("")
    runs: dict[str, list[LedgerEntry]] = {}
    for e in entries:
        runs.setdefault(e.run_id, []).append(e)
    for run_id, run_entries in runs.items():
        eps = RdpAccountant(rounds=[e.release() for e in run_entries]).epsilon(
            min(e.delta for e in run_entries))
        lines.append(f"run {run_id}: {len(run_entries)} rounds, epsilon {eps:.4g} "
                     f"(delta {min(e.delta for e in run_entries):g})")
    total_delta = min(e.delta for e in entries)
    total = RdpAccountant(rounds=[e.release() for e in entries]).epsilon(total_delta)
    plural = "s" if len(runs) != 1 else ""
    lines.append(f"total: epsilon {total:.4g} (delta {total_delta:g}) over {len(runs)} run{plural}")
    if budget is not None:
        lines.append(f"budget: {budget:g}, left: {max(budget - total, 0.0):.4g}")
    return "\n".join(lines)
