"""Global-model checkpoints written atomically after every round."""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_torch_save",
    "capture_rng",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

log = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with :func:`torch.save` to a temporary file, then rename it into place.

    A crash while writing leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def capture_rng() -> dict[str, Any]:
    """The server process's random state (torch, numpy, Python), in a form torch can save."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def save_checkpoint(
    out_dir: Path, server_round: int, state_dict: dict[str, torch.Tensor],
    run_config: dict[str, Any], *, rng: dict[str, Any] | None = None,
    strategy_state: dict[str, Any] | None = None,
) -> Path:
    """Save the global model after ``server_round``.

    Writes ``checkpoints/round-NNN.pt`` and updates ``model-latest.pt`` in ``out_dir``.
    Each file holds ``{"round", "state_dict", "run_config"}`` and, for resuming, the
    server's random state ``"rng"`` (see :func:`capture_rng`) and the aggregation
    strategy's state ``"strategy"`` (a server optimiser's moments, see
    :meth:`fedrad.server.strategies.Aggregator.state_dict`).
    """
    payload = {"round": server_round, "state_dict": state_dict, "run_config": run_config,
               "rng": rng if rng is not None else capture_rng()}
    if strategy_state is not None:
        payload["strategy"] = strategy_state
    path = Path(out_dir) / "checkpoints" / f"round-{server_round:03d}.pt"
    atomic_torch_save(payload, path)
    latest = Path(out_dir) / "model-latest.pt"
    if not _link_into_place(path, latest):  # a file system without hard links
        atomic_torch_save(payload, latest)
    log.debug("saved the global model of round %d to %s", server_round, path)
    return path


def _link_into_place(source: Path, path: Path) -> bool:
    """Make ``path`` a hard link to ``source``, atomically (False where links fail).

    ``model-latest.pt`` is then the same file as the round's checkpoint: written (and
    synced) once, never rewritten in place (every save renames a new file over it).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
    except OSError:
        return False
    os.replace(tmp, path)
    return True


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


_ROUND_FILE = re.compile(r"^round-(\d+)\.pt$")


def latest_checkpoint(out_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """The newest readable ``checkpoints/round-NNN.pt`` of ``out_dir`` as ``(round, payload)``.

    ``None`` when there is none. A file that cannot be read (which atomic writes should
    never leave) is skipped with a warning and the one before it is used.
    """
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if (m := _ROUND_FILE.match(p.name))), reverse=True)
    for server_round, path in found:
        try:
            return server_round, load_checkpoint(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file: fall back to the one before
            log.warning("checkpoint %s cannot be read (%s: %s); trying the one before",
                        path.name, type(err).__name__, err)
    return None
