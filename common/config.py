"""One typed settings loader for every fedrad run.

Flower hands the apps a flat ``run_config`` of kebab-case scalars (from
``[tool.flwr.app.config]`` and ``flwr run --run-config``); the in-process simulation hands
them an empty one.  :func:`load_settings` fills the defaults, converts strings, rejects
unknown keys and bad values with an error that names the key and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

__all__ = ["Settings", "load_settings", "SETTINGS_KEYS", "SERVER_ONLY_KEYS", "parse_overrides",
           "STRATEGIES", "ROBUST_STRATEGIES"]

_OPTIMIZERS = ("sgd", "adam", "adamw")
#: Aggregation strategies (see :mod:`fedrad.server.strategies`).
STRATEGIES = ("fedavg", "fedprox", "fedbn", "fedadam", "fedyogi", "fedadagrad", "median",
              "trimmed-mean", "krum")
#: Strategies that need every site's own update, which secure aggregation hides.
ROBUST_STRATEGIES = frozenset({"median", "trimmed-mean", "krum"})


def _meta(help_: str, choices: tuple[str, ...] | None = None, minimum: float | None = None,
          maximum: float | None = None) -> dict[str, Any]:
    return {"help": help_, "choices": choices, "min": minimum, "max": maximum}


@dataclass(frozen=True)
class Settings:
    """Run settings shared by the ServerApp, the ClientApp and the fedrad CLI.

    Attribute names are the snake_case form of the kebab-case run-config keys
    (``num-server-rounds`` -> ``num_server_rounds``).
    """

    num_server_rounds: int = field(default=3, metadata=_meta("federated rounds", minimum=1))
    model: str = field(default="resnet18", metadata=_meta("model name from fedrad's registry"))
    num_classes: int = field(default=2, metadata=_meta("number of label classes", minimum=2))
    image_size: int = field(default=64, metadata=_meta("square input size in pixels",
                                                        minimum=8, maximum=1024))
    stem: str = field(default="auto", metadata=_meta(
        "CNN input stem: standard (stride-2 conv + max-pool), small (3x3 stride-1, for "
        "28-32 px inputs) or auto (small at <= 32 px)", choices=("auto", "standard", "small")))
    local_epochs: int = field(default=1, metadata=_meta("local epochs per round", minimum=1))
    local_steps: int = field(default=0, metadata=_meta(
        "when > 0, every site trains exactly this many batches per round in place of "
        "local-epochs (the same steps at a large and a small site; simulations' pooled "
        "baseline trains sites x local-steps batches per round)", minimum=0))
    batch_size: int = field(default=32, metadata=_meta("training batch size", minimum=1))
    learning_rate: float = field(default=0.01, metadata=_meta("optimiser learning rate",
                                                               minimum=0.0))
    optimizer: str = field(default="sgd", metadata=_meta("local optimiser", choices=_OPTIMIZERS))
    momentum: float = field(default=0.9, metadata=_meta("SGD momentum", minimum=0.0, maximum=1.0))
    weight_decay: float = field(default=0.0, metadata=_meta("weight decay", minimum=0.0))
    augment: str = field(default="none", metadata=_meta(
        "training-time augmentation: none, or affine (each training image under its own "
        "random rotation up to 10 degrees, zoom 0.85-1.15 and shift up to 8 %; no flips)",
        choices=("none", "affine")))
    logit_adjust: float = field(default=0.0, metadata=_meta(
        "label-skew correction: each site trains on logits plus this times the log of its "
        "own class frequencies (logit adjustment; 1 is the usual strength, 0 plain "
        "cross-entropy); the model is scored on its plain logits", minimum=0.0, maximum=4.0))
    lr_decay: float = field(default=1.0, metadata=_meta(
        "multiply the learning rate by this after every round", minimum=0.0, maximum=1.0))
    val_fraction: float = field(default=0.2, metadata=_meta(
        "fraction of each site's cache held out for site-side evaluation",
        minimum=0.0, maximum=0.9))
    cv_folds: int = field(default=0, metadata=_meta(
        "k-fold cross-validation: each site's held-out split is fold cv-fold of cv-folds "
        "stratified folds instead of val-fraction (0: off)", minimum=0))
    cv_fold: int = field(default=0, metadata=_meta(
        "k-fold cross-validation: which fold (0 to cv-folds - 1) is held out", minimum=0))
    min_sites: int = field(default=2, metadata=_meta(
        "fewest sites that must answer for a round to count", minimum=1))
    fraction_train: float = field(default=1.0, metadata=_meta(
        "fraction of connected sites asked to train each round (plain rounds: needs "
        "secure-aggregation=false)", minimum=0.0, maximum=1.0))
    evaluate_with_training: bool = field(default=True, metadata=_meta(
        "plain rounds with fraction-train 1: each site scores the global model it receives "
        "on its held-out split before training on it, in the same message (one model "
        "download per site per round instead of two; a round's pooled and per-site rows "
        "arrive with the next round's training replies, the last round's from one final "
        "evaluation); off: a separate evaluation message after every round"))
    seed: int = field(default=0, metadata=_meta("random seed", minimum=0))
    denoise_sigma: float = field(default=0.5, metadata=_meta(
        "Gaussian noise-reduction sigma in output pixels (0 disables)", minimum=0.0))
    equalize: bool = field(default=True, metadata=_meta("histogram equalisation on/off"))
    score_bins: int = field(default=1000, metadata=_meta(
        "score-histogram bins used for pooled ROC AUC", minimum=10, maximum=100000))
    amp: bool = field(default=True, metadata=_meta("mixed precision (bf16) on CUDA"))
    channels_last: bool = field(default=True, metadata=_meta("channels-last memory on CUDA"))
    weights_path: str = field(default="", metadata=_meta(
        "optional local weights file (.pt state dict) to start from"))
    out_dir: str = field(default="runs/latest", metadata=_meta(
        "server output folder: checkpoints, metrics JSON/CSV"))
    central_eval_dir: str = field(default="", metadata=_meta(
        "prepared cache of a held-out set for central evaluation (empty: none)"))
    resume: bool = field(default=False, metadata=_meta(
        "continue the run in out-dir from its last completed round (its checkpoint, metrics "
        "history and random state) instead of starting afresh"))
    class_names: str = field(default="", metadata=_meta(
        "comma-separated class names, in label order (empty: class-0, class-1, ...)"))
    secure_aggregation: bool = field(default=True, metadata=_meta(
        "SecAgg+ secure aggregation of training updates and evaluation counts: the server "
        "only ever sees sums (off: plain FedAvg with per-site evaluation rows)"))
    secagg_threshold: int = field(default=0, metadata=_meta(
        "shares needed to unmask (t); a round survives up to n - t dropouts after masking "
        "(0: a majority of each neighbourhood, at least 2)", minimum=0))
    secagg_degree: int = field(default=0, metadata=_meta(
        "SecAgg+ neighbours per site, even (0: every other site, plain SecAgg)", minimum=0))
    secagg_clip: float = field(default=16.0, metadata=_meta(
        "secure aggregation clips each update value to +-this before fixed-point encoding",
        minimum=1.0))
    secagg_max_examples: int = field(default=1000000, metadata=_meta(
        "public upper bound on the cohort's total training samples, used as the weight "
        "normaliser in the first secure round (later rounds use the securely summed total)",
        minimum=1))
    strategy: str = field(default="fedavg", metadata=_meta(
        "aggregation strategy: fedavg; fedprox (proximal term at the sites); fedbn "
        "(normalisation layers stay at each site); fedadam, fedyogi, fedadagrad (a server "
        "optimiser on the mean update); median, trimmed-mean, krum (robust, need "
        "secure-aggregation=false)", choices=STRATEGIES))
    proximal_mu: float = field(default=0.01, metadata=_meta(
        "fedprox: weight mu of the proximal term (mu / 2) * ||w - w_global||^2", minimum=0.0))
    server_step: float = field(default=1.0, metadata=_meta(
        "fedavg / fedprox / fedbn: the next global model moves this fraction of the way "
        "from the current one to the sites' weighted mean (1: the mean itself; below 1 "
        "damps rounds in which sites with opposite class mixes overshoot each other)",
        minimum=0.05, maximum=1.0))
    server_learning_rate: float = field(default=0.01, metadata=_meta(
        "fedadam / fedyogi / fedadagrad: the server optimiser's step size", minimum=0.0))
    server_beta1: float = field(default=0.9, metadata=_meta(
        "fedadam / fedyogi: first-moment decay", minimum=0.0, maximum=1.0))
    server_beta2: float = field(default=0.99, metadata=_meta(
        "fedadam / fedyogi: second-moment decay", minimum=0.0, maximum=1.0))
    server_tau: float = field(default=1e-3, metadata=_meta(
        "fedadam / fedyogi / fedadagrad: adaptivity (added to the root of the second "
        "moment)", minimum=0.0))
    trim_fraction: float = field(default=0.2, metadata=_meta(
        "trimmed-mean: fraction of sites cut from each end, per coordinate",
        minimum=0.0, maximum=0.49))
    krum_byzantine: int = field(default=1, metadata=_meta(
        "krum: number of faulty sites to tolerate (needs at least 2 x this + 3 sites)",
        minimum=0))
    round_timeout: float = field(default=3600.0, metadata=_meta(
        "seconds the server waits for the sites' replies in each step of a round; a site "
        "that has not answered by then is a straggler and counts as dropped", minimum=1.0))
    dp_noise_multiplier: float = field(default=0.0, metadata=_meta(
        "differential privacy: each site adds Gaussian noise of std dp-noise-multiplier x "
        "dp-clip to every coordinate of its clipped update (0: DP off)", minimum=0.0))
    dp_clip: float = field(default=1.0, metadata=_meta(
        "differential privacy: L2 bound on each site's update (new minus received weights)",
        minimum=0.0))
    dp_delta: float = field(default=1e-5, metadata=_meta(
        "differential privacy: delta of the (epsilon, delta) guarantee each site accounts",
        minimum=0.0, maximum=0.1))

    def to_run_config(self) -> dict[str, Any]:
        """Return the settings as a flat kebab-case mapping (Flower's run-config form)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied and validated."""
        return load_settings({k.replace("_", "-"): v for k, v in
                              {**dataclasses.asdict(self), **changes}.items()})

    def to_site_config(self) -> dict[str, Any]:
        """The run-config form without coordinator-side paths: what is sent to the sites."""
        return {k: v for k, v in self.to_run_config().items() if k not in SERVER_ONLY_KEYS}

    @property
    def classes(self) -> list[str]:
        """Class names in label order."""
        if self.class_names:
            return [c.strip() for c in self.class_names.split(",")]
        return [f"class-{i}" for i in range(self.num_classes)]


#: Settings that name coordinator-side files; they are never sent to the sites.
SERVER_ONLY_KEYS: frozenset[str] = frozenset(
    {"out-dir", "central-eval-dir", "weights-path", "resume"})

SETTINGS_KEYS: tuple[str, ...] = tuple(f.name.replace("_", "-") for f in fields(Settings))
_FIELDS = {f.name.replace("_", "-"): f for f in fields(Settings)}


def _convert(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return int(as_float)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}' must be a number, got {value!r}") from None
    return str(value)


def load_settings(run_config: Mapping[str, Any] | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from a Flower run config plus keyword overrides.

    Keys may be kebab-case (``local-epochs``) or snake_case (``local_epochs``).

    Raises
    ------
    ConfigError
        For an unknown key (the message lists close matches and all accepted keys) or a
        value of the wrong type or out of range (the message says what is accepted).
    """
    merged: dict[str, Any] = {}
    for source in (run_config or {}), overrides:
        for raw_key, value in source.items():
            key = str(raw_key).replace("_", "-")
            if key not in _FIELDS:
                close = difflib.get_close_matches(key, SETTINGS_KEYS, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"Unknown setting '{raw_key}'.{hint} Accepted settings: "
                    + ", ".join(SETTINGS_KEYS)
                )
            merged[key] = value
    values: dict[str, Any] = {}
    for key, f in _FIELDS.items():
        typ = type(f.default)
        value = _convert(key, merged[key], typ) if key in merged else f.default
        if typ is float and not math.isfinite(value):
            raise ConfigError(f"'{key}' must be a finite number; got {value!r}")
        meta = f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(
                f"'{key}' must be one of {', '.join(meta['choices'])}; got {value!r}"
            )
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"'{key}' must be >= {meta['min']} ({meta['help']}); got {value!r}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"'{key}' must be <= {meta['max']} ({meta['help']}); got {value!r}")
        values[f.name] = value
    settings = Settings(**values)
    if settings.class_names and len(settings.classes) != settings.num_classes:
        raise ConfigError(
            f"'class-names' lists {len(settings.classes)} names but 'num-classes' is "
            f"{settings.num_classes}; give one name per class"
        )
    if settings.secagg_degree % 2:
        raise ConfigError(
            f"'secagg-degree' must be even (or 0 for every other site); got "
            f"{settings.secagg_degree}"
        )
    if settings.cv_folds == 1 or (settings.cv_folds and settings.cv_fold >= settings.cv_folds):
        raise ConfigError(
            f"'cv-folds' must be 0 (off) or at least 2, and 'cv-fold' below it; got "
            f"cv-folds={settings.cv_folds}, cv-fold={settings.cv_fold}")
    if settings.secagg_threshold == 1:
        raise ConfigError("'secagg-threshold' must be 0 (automatic) or at least 2; got 1")
    if settings.fraction_train < 1.0 and settings.secure_aggregation:
        raise ConfigError(
            f"'fraction-train' {settings.fraction_train:g} samples sites in plain rounds only: "
            "under secure aggregation every site that holds keys trains each round. Set "
            "secure-aggregation=false to sample, or leave fraction-train at 1.0")
    if settings.strategy in ROBUST_STRATEGIES and settings.secure_aggregation:
        raise ConfigError(
            f"'strategy' {settings.strategy} needs each site's own update, which secure "
            "aggregation hides from the server; set secure-aggregation=false, or use fedavg, "
            "fedprox, fedbn, fedadam, fedyogi or fedadagrad"
        )
    if settings.server_step != 1.0 and settings.strategy not in ("fedavg", "fedprox", "fedbn"):
        raise ConfigError(
            f"'server-step' {settings.server_step:g} applies to fedavg, fedprox and fedbn; "
            f"strategy {settings.strategy} "
            + ("moves by server-learning-rate" if settings.strategy in
               ("fedadam", "fedyogi", "fedadagrad") else "does not average")
            + ": leave server-step at 1.0")
    if settings.dp_clip <= 0:
        raise ConfigError(f"'dp-clip' must be > 0 (the L2 bound on a site's update); got "
                          f"{settings.dp_clip!r}")
    if settings.dp_delta <= 0:
        raise ConfigError(f"'dp-delta' must be > 0, e.g. 1e-5 (well below 1 / the number of "
                          f"records); got {settings.dp_delta!r}")
    return settings


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """Parse ``["key=value", ...]`` (CLI ``--set``) into a mapping; values stay strings."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"Expected key=value, got {item!r} (e.g. --set local-epochs=2)")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out
