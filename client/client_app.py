"""fedrad's Flower ClientApp: one per hospital site.

The app is thin: it reads the site's node config (``data-dir``, ``site-id``), takes the
run settings from the server's message, and calls plain-Python code in
:mod:`fedrad.common` to train and evaluate on the site's prepared cache.

Everything this module sends is listed in :func:`_site_record` and the two handlers:
model weights, sample counts, a training loss, outcome counts and score histograms.
Exceptions raised here are sent to the server by Flower, so they are converted to a
:class:`~fedrad.common.errors.FedradError` whose text carries only a reason code and a
hashed site identifier.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedrad.client.egress import egress_mod
from fedrad.client.privacy import SitePrivacy, check_privacy_budget, privatize_update
from fedrad.common.arrays import (
    LAYOUT,
    array_values,
    model_arrays,
    packed_content,
    record_of,
    state_dict_view,
)
from fedrad.common.cache import SiteCache, load_cache
from fedrad.common.config import Settings, load_settings
from fedrad.common.errors import FedradError, SiteDataError, hashed_id
from fedrad.common.metrics import (
    EVALUATE_RECEIVED,
    EVALUATION,
    count_outcomes,
    counts_to_metrics,
)
from fedrad.common.models import model_from_settings, norm_state_keys
from fedrad.common.ray_transport import in_ray_worker, use_out_of_band_arrays
from fedrad.common.secagg.wire import (
    ECHO,
    MASKED,
    QUERY_ACTION,
    RECORD,
    counts_to_vector,
    update_to_vector,
)
from fedrad.common.splits import site_split
from fedrad.common.training import cpu_budget, predict_scores, select_device, train_local

from .secure_client import handle_query, mask_vector

__all__ = ["app", "make_client_app", "SiteContext", "train_on_site", "evaluate_on_site"]

log = logging.getLogger(__name__)

NODE_DATA_DIR = "data-dir"
NODE_SITE_ID = "site-id"
NODE_DEVICE = "device"
#: node config: torch CPU threads for this site's training (default: the CPUs it may use)
NODE_CPU_THREADS = "cpu-threads"
#: ``context.state`` record holding a FedBN site's own normalisation layers (never sent)
LOCAL_NORMS = "fedbn-local-norms"


@dataclass(frozen=True)
class SiteContext:
    """Where a site's cache lives and how the site names itself."""

    site_id: str
    data_dir: Path
    device: str = "auto"
    privacy: SitePrivacy = SitePrivacy()  # budget and ledger: privacy-* node config

    @property
    def safe_id(self) -> str:
        """The site's name as it may appear in messages to the server."""
        return self.site_id


def _site_from_node_config(
    node_config: Mapping[str, Any], sites: Mapping[int, SiteContext] | None
) -> SiteContext:
    device = str(node_config.get(NODE_DEVICE, "auto"))
    if NODE_DATA_DIR in node_config:
        data_dir = Path(str(node_config[NODE_DATA_DIR]))
        site_id = str(node_config.get(NODE_SITE_ID) or f"site-{hashed_id(str(data_dir))[:6]}")
        return SiteContext(site_id=site_id, data_dir=data_dir, device=device,
                           privacy=SitePrivacy.from_node_config(node_config))
    if sites is not None and "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if pid not in sites:
            raise SiteDataError(
                "no-site-data",
                f"simulated node {pid} has no site data; the simulation has "
                f"{len(sites)} sites, so run it with num-supernodes={len(sites)}",
            )
        return sites[pid]
    raise SiteDataError(
        "no-data-dir",
        "this SuperNode was started without a site folder: pass "
        "--node-config \"data-dir=/path/to/prepared/cache site-id=my-site\" to flower-supernode",
    )


@lru_cache(maxsize=8)
def _open_cache(path: str, stamp: float) -> SiteCache:
    return load_cache(path)


def _load_site_cache(path: str) -> SiteCache:
    """Open a site cache once per process; a re-prepared cache is opened afresh."""
    try:
        stamp = (Path(path) / "manifest.json").stat().st_mtime
    except OSError:
        stamp = -1.0  # load_cache raises the clear "no-cache" error
    return _open_cache(path, stamp)


def _site_split(cache: SiteCache, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    return site_split(np.asarray(cache.labels), settings)


def _check_cache(cache: SiteCache, settings: Settings, site: SiteContext) -> None:
    size = int(cache.images.shape[-1])
    if size != settings.image_size:
        raise SiteDataError(
            "image-size-mismatch",
            f"site {site.safe_id} prepared its images at {size} px but the run uses "
            f"image-size={settings.image_size}; re-run site preparation with the run's "
            "image size",
        )
    num_classes = int(cache.meta.get("num_classes", settings.num_classes))
    if num_classes != settings.num_classes:
        raise SiteDataError(
            "class-count-mismatch",
            f"site {site.safe_id} was prepared for {num_classes} classes but the run "
            f"has num-classes={settings.num_classes}",
        )


#: Per thread, the last model built: every message of a run needs the same architecture.
#: It is built as a shell (no random initialisation: every weight is loaded into it), which
#: for a ResNet-18 on one core takes 16 ms instead of 85 ms; a forked ClientApp process
#: (a deployed site's task) builds it once, a simulation's actor once for all its sites.
_MODEL_CACHE = threading.local()


def _model_for(settings: Settings):
    """A model of the run's architecture; its weights are whatever it held last."""
    key = (settings.model, settings.num_classes, settings.image_size, settings.stem)
    cached = getattr(_MODEL_CACHE, "entry", None)
    if cached is None or cached[0] != key:
        _MODEL_CACHE.entry = None  # drop the old one before building the next
        # a shell: _build_model loads every parameter and buffer into it (strict)
        _MODEL_CACHE.entry = (key, model_from_settings(settings, initialise=False))
    return _MODEL_CACHE.entry[1]


def _build_model(settings: Settings, arrays: ArrayRecord,
                 local_norms: Mapping[str, np.ndarray] | None = None):
    """The run's model holding exactly ``arrays`` (and a FedBN site's own norm layers).

    The model object is reused between messages (see :data:`_MODEL_CACHE`): every
    parameter and buffer is overwritten here (``strict`` loading), so nothing of an earlier
    message survives but the object.
    """
    model = _model_for(settings)
    state = state_dict_view(arrays)  # read-only views: load_state_dict copies them
    if local_norms:
        import torch

        for key, value in local_norms.items():
            if key in state and tuple(state[key].shape) == tuple(value.shape):
                state[key] = torch.from_numpy(np.array(value)).to(state[key].dtype)
    model.load_state_dict(state, strict=True)
    return model


@lru_cache(maxsize=4)
def _norm_keys(model: str, num_classes: int, image_size: int, stem: str) -> tuple[str, ...]:
    settings = load_settings({"model": model, "num-classes": num_classes,
                              "image-size": image_size, "stem": stem})
    return tuple(norm_state_keys(model_from_settings(settings, initialise=False)))


def _stored_norms(context: Context, settings: Settings) -> dict[str, np.ndarray] | None:
    if settings.strategy != "fedbn" or LOCAL_NORMS not in context.state:
        return None
    return {k: v.numpy() for k, v in context.state[LOCAL_NORMS].items()}


def train_on_site(
    arrays: ArrayRecord, settings: Settings, site: SiteContext, server_round: int = 1,
    run_id: int | str = "local", local_norms: Mapping[str, np.ndarray] | None = None,
    kept_norms: dict[str, np.ndarray] | None = None,
) -> tuple[ArrayRecord, dict[str, int | float]]:
    """Train the received global model on the site's training split.

    ``local_norms`` (FedBN) replace the global model's normalisation layers before
    training; with ``strategy = fedprox`` the loss carries the proximal term
    ``proximal-mu``.  Returns the updated weights and the metrics to send:
    ``num-examples`` (the count of training samples) and ``train-loss``.  ``kept_norms``,
    when given, receives the trained normalisation-layer tensors as trained: what a FedBN
    site keeps, never the clipped and noised values that differential privacy sends.
    """
    cache = _load_site_cache(str(site.data_dir))
    _check_cache(cache, settings, site)
    check_privacy_budget(settings, site, run_id, server_round)  # refuse before training
    train_idx, _ = _site_split(cache, settings)
    if len(train_idx) == 0:
        raise SiteDataError("no-training-data", f"site {site.safe_id} has no training samples")
    model = _build_model(settings, arrays, local_norms)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    lr = settings.learning_rate * (settings.lr_decay ** max(server_round - 1, 0))
    result = train_local(
        model,
        np.asarray(cache.images[train_idx]),
        np.asarray(cache.labels[train_idx]),
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        learning_rate=lr,
        optimizer=settings.optimizer,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        device=select_device(site.device),
        amp=settings.amp,
        channels_last=settings.channels_last,
        seed=settings.seed + server_round,
        proximal_mu=settings.proximal_mu if settings.strategy == "fedprox" else 0.0,
        augment=settings.augment,
        logit_adjust=settings.logit_adjust,
        steps=settings.local_steps or None,
    )
    state = {k: v.detach().to("cpu").to(dtypes[k]) for k, v in model.state_dict().items()}
    if kept_norms is not None:  # copies: the tensors are the (reused) model's own
        keys = _norm_keys(settings.model, settings.num_classes, settings.image_size,
                          settings.stem)
        kept_norms.update({k: state[k].numpy().copy() for k in keys if k in state})
    # DP (dp-noise-multiplier > 0): clip and noise the update, record it in the ledger
    state, dp_metrics = privatize_update(lambda: state_dict_view(arrays), state, settings,
                                         site, run_id, server_round)
    metrics = {
        **dp_metrics,
        "num-examples": int(result.num_examples),
        "train-loss": float(result.mean_loss),
        "train-seconds": float(result.seconds),
    }
    log.info(
        "site %s round %d: trained on %d samples, loss %.4f, %.1f img/s",
        site.safe_id, server_round, result.num_examples, result.mean_loss,
        result.images_per_second,
    )
    return record_of(state), metrics


def evaluate_on_site(
    arrays: ArrayRecord, settings: Settings, site: SiteContext,
    local_norms: Mapping[str, np.ndarray] | None = None,
) -> dict[str, int | float | list[int]]:
    """Score the received model (with a FedBN site's ``local_norms``) on the held-out split.

    Returns outcome counts (confusion matrix and per-class score histograms) in the flat
    form the server sums: no per-sample scores, no identifiers.
    """
    cache = _load_site_cache(str(site.data_dir))
    _check_cache(cache, settings, site)
    _, val_idx = _site_split(cache, settings)
    if len(val_idx) == 0:
        raise SiteDataError(
            "no-validation-data",
            f"site {site.safe_id} has no held-out samples; set val-fraction > 0",
        )
    model = _build_model(settings, arrays, local_norms)
    scores = predict_scores(
        model,
        np.asarray(cache.images[val_idx]),
        device=select_device(site.device),
        amp=settings.amp,
        channels_last=settings.channels_last,
    )
    counts = count_outcomes(scores, np.asarray(cache.labels[val_idx]), bins=settings.score_bins)
    metrics: dict[str, int | float | list[int]] = {"num-examples": int(len(val_idx))}
    metrics.update(counts_to_metrics(counts))
    return metrics


def training_sample_count(settings: Settings, site: SiteContext) -> int:
    """Size of the site's training split (what ``train_on_site`` reports as num-examples)."""
    cache = _load_site_cache(str(site.data_dir))
    train_idx, _ = _site_split(cache, settings)
    return int(len(train_idx))


def _site_record(site: SiteContext) -> ConfigRecord:
    return ConfigRecord({"site-id": site.safe_id})


def _settings_from(msg: Message, context: Context) -> Settings:
    """Run settings: the server's config record wins over the local run config."""
    config = dict(msg.content["config"]) if "config" in msg.content else {}
    config.pop("server-round", None)
    config.pop(EVALUATE_RECEIVED, None)
    base = {k: v for k, v in context.run_config.items() if k not in config}
    return load_settings({**base, **config})


@lru_cache(maxsize=1)
def _torch_default_threads() -> int:
    """torch's own choice, before fedrad sets anything (the machine's physical cores)."""
    import torch

    return torch.get_num_threads()


def site_cpu_threads(node_config: Mapping[str, Any]) -> int:
    """torch CPU threads for a deployed site: ``cpu-threads`` in its node config, else
    torch's default capped by :func:`~fedrad.common.training.cpu_budget` (the site's
    affinity mask and container CPU quota)."""
    value = node_config.get(NODE_CPU_THREADS)
    if value is None or value == "":
        return min(_torch_default_threads(), cpu_budget())
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1:
        raise FedradError("bad-node-config",
                          f"{NODE_CPU_THREADS}={value!r} in the SuperNode's --node-config: give "
                          "a whole number of threads, 1 or more (or leave it out: the CPUs the "
                          "site may use)")
    return n


def _received_model(msg: Message) -> ArrayRecord:
    """The model a server message carries (packed into one Array, or one Array per tensor)."""
    try:
        return model_arrays(msg.content)
    except KeyError:
        raise FedradError("bad-message", "the server's message carries no model") from None
    except ValueError as err:
        raise FedradError("bad-message", f"the server's packed model: {err}") from None


def _model_reply(msg: Message, arrays: ArrayRecord) -> dict[str, Any]:
    """The reply's model records: packed when the server sent its model packed."""
    if LAYOUT in msg.content.config_records:
        return packed_content(arrays)
    return {"arrays": arrays}


def _safe(fn: Callable[[], Message], site_label: str) -> Message:
    """Run ``fn``; turn any failure into an error text that is safe to leave the site."""
    try:
        return fn()
    except FedradError as err:
        log.error("site %s: %s (%s)", site_label, err, err.local_detail or "no local detail")
        raise FedradError(err.code, err.message) from None
    except Exception as err:  # noqa: BLE001 - the text of unknown errors must stay local
        log.exception("site %s: unexpected error", site_label)
        raise FedradError(
            "site-internal-error",
            f"site {site_label} failed with {type(err).__name__}; see the site's local log",
        ) from None


def make_client_app(
    sites: Mapping[int, SiteContext] | None = None, *, threads: int | None = None
) -> ClientApp:
    """Build the ClientApp.

    ``sites`` maps a simulated node's ``partition-id`` to its site (name and cache folder);
    deployed SuperNodes instead name their folder with ``--node-config data-dir=...``.
    ``threads`` caps torch's CPU threads per simulated site, so that sites training side
    by side do not oversubscribe the cores (which slows torch down several times).
    """
    # The egress log comes first: it records each reply exactly as it leaves the site.
    client_app = ClientApp(mods=[egress_mod])

    def _prepare_process(context: Context) -> None:
        """Per message: torch's CPU threads, and (in a Ray actor) the out-of-band transport."""
        import torch

        wanted = threads if threads is not None else site_cpu_threads(context.node_config)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        if in_ray_worker():  # a simulated site: its replies' weights go to Ray out of band
            use_out_of_band_arrays()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        label = str(context.node_config.get(NODE_SITE_ID, "unnamed-site"))

        def run() -> Message:
            _prepare_process(context)
            site = _site_from_node_config(context.node_config, sites)
            settings = _settings_from(msg, context)
            server_round = int(msg.content["config"].get("server-round", 1))
            fedbn = settings.strategy == "fedbn"
            trained_norms: dict[str, np.ndarray] = {}
            evaluation = None
            received = _received_model(msg)
            if msg.content["config"].get(EVALUATE_RECEIVED):  # first score what arrived
                try:
                    evaluation = evaluate_on_site(received, settings, site,
                                                  local_norms=_stored_norms(context, settings))
                except SiteDataError as err:
                    if err.code != "no-validation-data":
                        raise
                    log.warning("site %s: %s; this reply carries the training update only",
                                site.safe_id, err.message)
            arrays, metrics = train_on_site(received, settings, site, server_round,
                                            run_id=context.run_id,
                                            local_norms=_stored_norms(context, settings),
                                            kept_norms=trained_norms if fedbn else None)
            if fedbn:  # the site's own trained norms stay here for next time
                context.state[LOCAL_NORMS] = ArrayRecord(
                    {k: Array(v) for k, v in trained_norms.items()})
            if RECORD in msg.content:  # secure aggregation: only the masked update leaves
                content = _secure_train_reply(msg, context, received, arrays, metrics)
            else:
                content = RecordDict({**_model_reply(msg, arrays),
                                      "metrics": MetricRecord(metrics),
                                      "site": _site_record(site)})
                if evaluation is not None:
                    content[EVALUATION] = MetricRecord(evaluation)
            _echo(msg, content)
            return Message(content=content, reply_to=msg)

        return _safe(run, label)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        label = str(context.node_config.get(NODE_SITE_ID, "unnamed-site"))

        def run() -> Message:
            _prepare_process(context)
            site = _site_from_node_config(context.node_config, sites)
            settings = _settings_from(msg, context)
            metrics = evaluate_on_site(_received_model(msg), settings, site,
                                       local_norms=_stored_norms(context, settings))
            if RECORD in msg.content:  # secure aggregation: only masked counts leave
                vector = counts_to_vector(metrics, num_classes=settings.num_classes,
                                          bins=settings.score_bins,
                                          train_examples=training_sample_count(settings, site))
                k, masked = mask_vector(msg.content[RECORD], context.state, vector)
                content = _masked_content(k, masked)
            else:
                content = RecordDict({"metrics": MetricRecord(metrics),
                                      "site": _site_record(site)})
            _echo(msg, content)
            return Message(content=content, reply_to=msg)

        return _safe(run, label)

    @client_app.query(QUERY_ACTION)
    def secagg(msg: Message, context: Context) -> Message:
        """Secure-aggregation key exchange and unmasking (no training, no data access)."""
        label = str(context.node_config.get(NODE_SITE_ID, "unnamed-site"))

        def run() -> Message:
            if RECORD not in msg.content:
                raise FedradError("bad-message", "a secure-aggregation query without its record")
            reply = handle_query(msg.content[RECORD], context.state)
            content = RecordDict({RECORD: ConfigRecord(reply)})
            _echo(msg, content)
            return Message(content=content, reply_to=msg)

        return _safe(run, label)

    return client_app


def _echo(msg: Message, content: RecordDict) -> None:
    """Copy the server's round nonce into the reply (the server rejects stale replies)."""
    if ECHO in msg.content:
        content[ECHO] = ConfigRecord(dict(msg.content[ECHO]))


def _masked_content(instance: int, masked: np.ndarray) -> RecordDict:
    return RecordDict({
        MASKED: record_of({MASKED: masked}),  # one copy (Flower's Array(ndarray) makes two)
        RECORD: ConfigRecord({"work-instance": int(instance)}),
    })


def _secure_train_reply(msg: Message, context: Context, received: ArrayRecord,
                        arrays: ArrayRecord, metrics: Mapping[str, Any]) -> RecordDict:
    """Mask ``local - global`` weights and the loss, weighted by the sample count."""
    reference = {k: array_values(v) for k, v in received.items()}
    local = {k: array_values(v) for k, v in arrays.items()}
    vector = update_to_vector(local, reference, float(metrics["train-loss"]))
    k, masked = mask_vector(msg.content[RECORD], context.state, vector,
                            weight=float(metrics["num-examples"]))
    return _masked_content(k, masked)


os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
app = make_client_app()
