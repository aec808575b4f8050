"""fedrad's Flower ServerApp: the sites' models aggregated, pooled metrics, checkpoints.

Thin on purpose: settings come from :func:`fedrad.common.config.load_settings`, the
metrics from :mod:`fedrad.common.metrics`, tables and files from
:mod:`fedrad.server.evaluator`.

With ``secure-aggregation`` (the default) the rounds run through
:class:`~fedrad.server.secure_rounds.SecureRounds`: the same checkpoints, central
evaluation and pooled rows, but the server only ever holds masked vectors and their sums,
so there are no per-site rows and every site that holds keys trains (``fraction-train``
applies to plain rounds only).  Without it, :class:`FedradFedAvg` runs Flower's FedAvg
message flow; in both, every reply is checked and a bad one is excluded with a reason
code, and the ``strategy`` setting's :class:`~fedrad.server.strategies.Aggregator` makes
the next global model (FedAvg, FedProx, FedBN, FedAdam/FedYogi/FedAdagrad; plain rounds
also median, trimmed mean and Krum).  Both paths take each reply as it arrives
(:class:`~fedrad.server.secure_rounds.ReplyStream`) and fold it into a running sum, so the
server's memory does not grow with the number of sites (the robust strategies alone keep
every site's model until the round's last reply).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedrad.common.arrays import (
    LAYOUT,
    all_finite,
    array_values,
    model_arrays,
    packed_content,
    record_of,
    record_to_fill,
    state_dict_view,
)
from fedrad.common.cache import load_cache
from fedrad.common.config import Settings, load_settings
from fedrad.common.errors import ConfigError, FedradError
from fedrad.common.metrics import (
    EVALUATE_RECEIVED,
    EVALUATION,
    OutcomeCounts,
    count_outcomes,
    counts_from_metrics,
    merge_counts,
    pooled_metrics,
)
from fedrad.common.models import model_from_settings
from fedrad.common.secagg.wire import ECHO
from fedrad.common.training import predict_scores, select_device

from .checkpoint import capture_rng, latest_checkpoint, restore_rng, save_checkpoint
from .evaluator import MetricsLog, format_final_summary, format_round_table
from .secure_rounds import ReplyRejected, ReplyStream, SecureRounds, trips_per_run
from .status import StatusWriter, attach_run_log
from .strategies import SERVER_OPTIMIZERS, Aggregator

__all__ = [
    "app",
    "make_server_app",
    "run_federation",
    "initial_model",
    "FedradFedAvg",
    "RoundReport",
    "check_echo",
    "check_train_reply",
]

log = logging.getLogger(__name__)

RoundCallback = Callable[["RoundReport"], None]


@dataclass
class RoundReport:
    """What the server knows after one round: pooled, per-site and central metrics."""

    server_round: int
    num_rounds: int
    rows: dict[str, dict[str, Any]]
    table: str
    failures: list[str]


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


#: A plain-path reply may be this much larger than the global model it answers.
_SLACK_BYTES = 64 * 1024


def _training_metrics(content: RecordDict) -> dict[str, MetricRecord]:
    """A training reply's metric records other than its evaluation counts."""
    return {k: v for k, v in content.metric_records.items() if k != EVALUATION}


def _reply_arrays(content: RecordDict) -> ArrayRecord:
    """The model a training reply carries (its one array record, packed or not)."""
    try:
        return model_arrays(content, next(iter(content.array_records.keys())))
    except ValueError as err:
        raise ReplyRejected("malformed", f"the reply's packed arrays: {err}") from None


def pack_messages(messages: Iterable[Message]) -> list[Message]:
    """``messages`` with their model (``arrays``) packed into one Array each, in place.

    Messages that share one ArrayRecord (every site gets the same global model) share
    its packed form too: it is packed once (see :func:`fedrad.common.arrays.pack_record`).
    """
    out = list(messages)
    packed: dict[int, dict[str, Any]] = {}
    for msg in out:
        arrays = msg.content.array_records.get("arrays")
        if arrays is None or not len(arrays) or LAYOUT in msg.content.config_records:
            continue  # no model, or packed already (Flower's messages may share a content)
        if id(arrays) not in packed:
            packed[id(arrays)] = packed_content(arrays)
        for key, record in packed[id(arrays)].items():
            msg.content[key] = record
    return out


def check_train_reply(content: RecordDict, reference: ArrayRecord) -> dict[str, np.ndarray]:
    """Validate a plain (non-secure) training reply against the global model it answers.

    Returns the reply's tensors, decoded once (the check reads every value).  Raises
    :class:`~fedrad.server.secure_rounds.ReplyRejected` with the code ``malformed``
    (records missing), ``wrong-shape`` (other tensors or shapes), ``bad-dtype``,
    ``oversized``, ``non-finite`` or ``bad-num-examples``.
    """
    training = _training_metrics(content)
    if len(content.array_records) != 1 or len(training) != 1:
        raise ReplyRejected("malformed", "a training reply holds one array and one metric record "
                            f"(besides its optional '{EVALUATION}' counts)")
    arrays = _reply_arrays(content)
    metrics = next(iter(training.values()))
    sent = sum(len(a.data) for a in arrays.values())
    if sent > sum(len(a.data) for a in reference.values()) + _SLACK_BYTES:
        raise ReplyRejected("oversized", f"the reply carries {sent} bytes of arrays")
    if list(arrays.keys()) != list(reference.keys()):
        raise ReplyRejected("wrong-shape", "the reply's tensors differ from the global model's")
    decoded: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        got = arrays[name]
        if got.dtype != ref.dtype:
            raise ReplyRejected("bad-dtype", f"tensor {name} is {got.dtype}, not {ref.dtype}")
        if list(got.shape) != list(ref.shape):
            raise ReplyRejected("wrong-shape", f"tensor {name} has shape {list(got.shape)}")
        try:
            value = decoded[name] = array_values(got)
        except ValueError as err:
            raise ReplyRejected("malformed", f"tensor {name}: {err}") from None
        if value.dtype.kind == "f" and not all_finite(value):
            raise ReplyRejected("non-finite", f"tensor {name} holds NaN or Inf")
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not (
        np.isfinite(n) and n > 0 and float(n).is_integer()
    ):
        raise ReplyRejected("bad-num-examples", "num-examples must be a positive integer")
    loss = metrics.get("train-loss", 0.0)
    if not isinstance(loss, (int, float)) or not np.isfinite(loss):
        raise ReplyRejected("non-finite", "train-loss is NaN or Inf")
    return decoded


def check_echo(content: RecordDict, server_round: int, nonce: bytes) -> None:
    """Raise ``ReplyRejected("replayed")`` unless the reply echoes this round's nonce."""
    echo = content.config_records.get(ECHO)
    if echo is None:
        raise ReplyRejected("malformed", "the reply does not echo the round's nonce")
    if bytes(echo.get("nonce", b"")) != nonce or int(echo.get("server-round", -1)) != (
        server_round
    ):
        raise ReplyRejected("replayed", "the reply echoes another round's nonce")


class _StreamingGrid:
    """``grid`` for Flower's strategy loop, with replies handed over as they arrive.

    ``send_and_receive`` pushes the messages at once and returns an iterator over the
    replies (:class:`~fedrad.server.secure_rounds.ReplyStream`: same timeout, duplicates
    dropped) instead of a list of all of them; :class:`FedradFedAvg`'s ``aggregate_*``
    consume it one reply at a time.  Everything else is ``grid``'s.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        stream = ReplyStream(self._grid, messages, timeout=timeout)
        return (reply for _, reply in stream)


class FedradFedAvg(FedAvg):
    """Flower's FedAvg message flow with fedrad's aggregation and pooled metrics.

    - Training: the ``strategy`` setting's :class:`~fedrad.server.strategies.Aggregator`
      turns the sites' weights (and ``num-examples``) into the next global model, each
      tensor in its own dtype; a round where fewer than ``min-sites`` sites answered keeps
      the previous global model and says so.  :meth:`start` hands each reply over as it
      arrives, and the mean strategies add it to a float64 running sum at once, so the
      server holds one reply and one sum, not every site's model.
    - Evaluation: the confusion counts and score histograms of all answering sites are
      summed; accuracy, sensitivity, specificity, F1 and AUC are computed from the sums
      (never averaged), plus one row per site.
    - With ``evaluate-with-training`` (and ``fraction-train`` 1) the evaluation rides with
      training: round ``r``'s training message asks every site to score the model it
      carries (the global model of round ``r - 1``) before training on it, and the reply
      brings those counts with the update, so each site downloads the model once per round,
      not twice.  Round ``r - 1``'s pooled and per-site rows are recorded when round ``r``'s
      replies are in (round 0's: the initial model, as under secure aggregation), and
      :attr:`on_evaluated` is told; only the last round sends an evaluation message.
    """

    def __init__(self, settings: Settings, metrics_log: MetricsLog,
                 aggregator: Aggregator | None = None) -> None:
        super().__init__(
            fraction_train=settings.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=settings.min_sites,
            min_evaluate_nodes=settings.min_sites,
            min_available_nodes=settings.min_sites,
        )
        self.settings = settings
        self.metrics_log = metrics_log
        self.aggregator = aggregator if aggregator is not None else Aggregator(settings)
        self.round_failures: dict[int, list[str]] = {}
        self._nonces: dict[tuple[str, int], bytes] = {}
        self._sent: dict[int, ArrayRecord] = {}
        #: the messages of each (step, round), to name the site of every missing reply
        self._asked: dict[tuple[str, int], list[Message]] = {}
        #: rounds already completed by the run this one resumes (Flower counts from 1)
        self.round_offset = 0
        #: optional :class:`~fedrad.server.status.StatusWriter` shown by ``fedrad status``
        self.status: StatusWriter | None = None
        #: called with a round once its site evaluation is recorded in the next round
        self.on_evaluated: Callable[[int], None] | None = None

    @property
    def evaluates_with_training(self) -> bool:
        """Whether each training message also asks for the received model's evaluation."""
        s = self.settings
        return (s.evaluate_with_training and not s.secure_aggregation
                and s.fraction_train >= 1.0)

    def evaluation_follows(self, server_round: int) -> bool:
        """Whether ``server_round``'s site evaluation comes with the next round's training."""
        return self.evaluates_with_training and 0 <= server_round < self.settings.num_server_rounds

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              ) -> Any:
        """Flower's strategy loop, its replies streamed (see :class:`_StreamingGrid`)."""
        return super().start(grid=_StreamingGrid(grid), initial_arrays=initial_arrays,
                             num_rounds=num_rounds, timeout=timeout,
                             train_config=train_config, evaluate_config=evaluate_config,
                             evaluate_fn=evaluate_fn)

    def note_failure(self, server_round: int, text: str) -> None:
        """Record one failure of ``server_round`` (it reaches the round's report)."""
        self.round_failures.setdefault(server_round, []).append(text)

    def _note_failures(self, server_round: int, kind: str, answered: Iterable[str],
                       errors: list[Message]) -> None:
        """Record error replies and sites that sent no reply before ``round-timeout``.

        ``answered`` holds the ``reply_to_message_id`` of every reply received (errors too).

        The SuperLink's own error replies (e.g. "Node Unavailable") come from node 1, the
        SuperLink: they are named by the site the message was sent to.
        """
        asked = {m.metadata.message_id: m.metadata.dst_node_id
                 for m in self._asked.pop((kind, server_round), [])}
        for msg in errors:
            node = asked.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            text = f"{kind}: node {node} failed: {msg.error.reason}"
            self.note_failure(server_round, text)
            log.warning("round %d %s", server_round, text)
        answered = set(answered)
        for message_id, node in asked.items():
            if message_id and message_id not in answered:
                text = (f"{kind}: node {node} excluded: [no-reply] no reply before "
                        f"round-timeout ({self.settings.round_timeout:g} s)")
                self.note_failure(server_round, text)
                log.warning("round %d %s", server_round, text)

    def _stamp(self, kind: str, server_round: int, messages: Iterable[Message]) -> list[Message]:
        nonce = os.urandom(16)
        self._nonces[(kind, server_round)] = nonce
        out = list(messages)
        for msg in out:
            msg.content[ECHO] = ConfigRecord({"server-round": server_round, "nonce": nonce})
        self._asked[(kind, server_round)] = out  # the grid gives them their ids when sent
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's training messages, each with this round's nonce to echo."""
        server_round += self.round_offset
        self._sent[server_round] = arrays
        if self.evaluates_with_training:
            config[EVALUATE_RECEIVED] = True  # scores the model of server_round - 1
        out = self._stamp("train", server_round, pack_messages(
            super().configure_train(server_round, arrays, config, grid)))
        if self.status is not None:
            self.status.step(server_round, "train", asked=[m.metadata.dst_node_id for m in out])
        return out

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """FedAvg's evaluation messages, each with this round's nonce to echo."""
        server_round += self.round_offset
        if self.evaluation_follows(server_round):
            return []  # the next round's training messages bring this evaluation
        out = self._stamp("evaluate", server_round, pack_messages(
            super().configure_evaluate(server_round, arrays, config, grid)))
        if self.status is not None:
            self.status.step(server_round, "evaluate",
                             asked=[m.metadata.dst_node_id for m in out])
        return out

    def _replies_in(self, server_round: int, replies: list[Message]) -> None:
        if self.status is not None:
            self.status.replies(
                [m.metadata.src_node_id for m in replies if not m.has_error()],
                self.round_failures.get(server_round, []))

    def _screen(self, kind: str, server_round: int, valid: list[Message]) -> list[Message]:
        """Drop replies that fail validation, recording each with its reason code."""
        return [m for m in valid if self._screen_one(kind, server_round, m) is not None]

    def _screen_one(self, kind: str, server_round: int,
                    msg: Message) -> dict[str, np.ndarray] | None:
        """Check one reply; None (recorded with its reason code) if it fails.

        A training reply checked against the sent model comes back as its decoded tensors
        (``{}`` otherwise).
        """
        nonce = self._nonces.get((kind, server_round))
        reference = self._sent.get(server_round) if kind == "train" else None
        try:
            if nonce is not None:
                check_echo(msg.content, server_round, nonce)
            if reference is not None:
                return check_train_reply(msg.content, reference)
        except ReplyRejected as e:
            self._exclude(kind, server_round, msg, e)
            return None
        return {}

    def _exclude(self, kind: str, server_round: int, msg: Message, e: ReplyRejected) -> None:
        """Record (and log) that ``msg`` is left out of the round, with the reason code."""
        text = f"{kind}: node {msg.metadata.src_node_id} excluded: [{e.code}] {e.message}"
        self.note_failure(server_round, text)
        log.warning("round %d %s", server_round, text)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The next global model from ``replies``, taken one at a time as they come.

        Each reply is checked, then (mean strategies) added to a running weighted sum and
        dropped; the robust strategies keep every site's model for the round's end.
        """
        server_round += self.round_offset
        sent = self._sent.get(server_round)
        if sent is None and self.aggregator.name in SERVER_OPTIMIZERS:
            raise FedradError("no-reference", f"round {server_round}: {self.aggregator.name} "
                              "needs the global model the sites trained from")
        running = self.aggregator.running_mean() if self.aggregator.streams else None
        kept: list[tuple[dict[str, np.ndarray], float]] = []
        answered: list[int] = []
        weights: list[float] = []
        losses: list[float] = []
        first: dict[str, np.ndarray] | None = None
        received: list[str] = []  # the message each reply answers
        errors: list[Message] = []  # error replies carry no model
        evaluated: list[tuple[str, OutcomeCounts]] = []  # the received model's, per site
        for msg in replies:
            received.append(msg.metadata.reply_to_message_id)
            if msg.has_error():
                errors.append(msg)
                continue
            model = self._screen_one("train", server_round, msg)
            if model is None:
                continue
            content = msg.content
            if not model:  # not checked against a sent model: decode it here
                try:
                    model = {k: array_values(v) for k, v in _reply_arrays(content).items()}
                except ReplyRejected as e:
                    self._exclude("train", server_round, msg, e)
                    continue
                except ValueError as e:
                    self._exclude("train", server_round, msg, ReplyRejected("malformed", str(e)))
                    continue
            metrics = next(iter(_training_metrics(content).values()))
            if self.evaluates_with_training:
                self._take_evaluation(server_round - 1, msg, evaluated, EVALUATION)
            n = float(metrics["num-examples"])
            if first is None and sent is None:  # keys, shapes and dtypes of the reply
                first = {k: np.zeros_like(v) for k, v in model.items()}
            if running is not None:
                running.add(model, n)
            else:
                kept.append((model, n))
            weights.append(n)
            losses.append(float(metrics.get("train-loss", float("nan"))))
            answered.append(int(msg.metadata.src_node_id))
            del msg, content, model  # this reply is no longer held
        log.info("round %d: %d training replies, %d failures", server_round, len(received),
                 len(errors))
        self._note_failures(server_round, "train", received, errors)
        self._sent.pop(server_round, None)  # every reply is in: the sent model is done
        if self.evaluates_with_training:
            self._record_evaluation(server_round - 1, evaluated)
            if self.on_evaluated is not None:
                self.on_evaluated(server_round - 1)
        if self.status is not None:
            self.status.replies(answered, self.round_failures.get(server_round, []))
        if len(answered) < self.settings.min_sites:
            log.warning(
                "round %d: %d of %d sites returned an update, fewer than min-sites=%d; "
                "the global model is kept unchanged for this round",
                server_round, len(answered), len(received), self.settings.min_sites,
            )
            return None, None
        if errors:
            log.warning("round %d: continuing with the %d sites that answered",
                        server_round, len(answered))
        # the sent model (replies are checked against it); else the replies' own form
        current = {k: array_values(v) for k, v in sent.items()} if sent is not None else first
        assert current is not None
        if running is not None:  # the mean goes straight into the next model's record
            arrays_out, slots = record_to_fill(current)
            self.aggregator.finish(current, running, into=slots)
        else:
            arrays_out = record_of(self.aggregator.aggregate(current, kept))
            kept.clear()
        total = sum(weights)
        metrics_out = MetricRecord({
            "num-examples": int(total),
            "train-loss": float(np.dot(weights, losses) / total) if total else float("nan"),
            "sites": len(answered),
        })
        return arrays_out, metrics_out

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        if not replies and self.evaluation_follows(server_round):
            return None  # none were sent: the next round's training replies bring them
        valid, errors = self._check_and_log_replies(replies, is_train=False, validate=False)
        self._note_failures(server_round, "evaluate",
                            [m.metadata.reply_to_message_id for m in replies], errors)
        valid = self._screen("evaluate", server_round, valid)
        self._replies_in(server_round, valid)
        per_site: list[tuple[str, OutcomeCounts]] = []
        for msg in valid:
            self._take_evaluation(server_round, msg, per_site, "metrics")
        return self._record_evaluation(server_round, per_site)

    @staticmethod
    def _site_of(msg: Message) -> str:
        site = f"node-{msg.metadata.src_node_id}"
        if "site" in msg.content.config_records:
            site = str(msg.content.config_records["site"].get("site-id", site))
        return site

    def _take_evaluation(self, server_round: int, msg: Message,
                         per_site: list[tuple[str, OutcomeCounts]], name: str) -> None:
        """Add the evaluation counts in reply ``msg``'s metric record ``name``."""
        site = self._site_of(msg)
        record = msg.content.metric_records.get(name)
        if record is None:
            log.warning("round %d: site %s sent no evaluation counts", server_round, site)
            return
        try:
            per_site.append((site, counts_from_metrics(record)))
        except FedradError as err:
            log.warning("round %d: site %s sent unusable evaluation counts: %s",
                        server_round, site, err)

    def _record_evaluation(self, server_round: int,
                           per_site: list[tuple[str, OutcomeCounts]]) -> MetricRecord | None:
        """The pooled row (summed counts) and one row per site of ``server_round``."""
        if len(per_site) < self.settings.min_sites:
            log.warning(
                "round %d: %d sites returned evaluation counts, fewer than min-sites=%d; "
                "no pooled metrics this round", server_round, len(per_site),
                self.settings.min_sites,
            )
            return None
        pooled = merge_counts([c for _, c in per_site])
        classes = self.settings.classes
        pooled_row = pooled_metrics(pooled, class_names=classes)
        self.metrics_log.record(server_round, "pooled", pooled_row, n=pooled.n)
        for site, counts in sorted(per_site):
            self.metrics_log.record(server_round, f"site:{site}",
                                    pooled_metrics(counts, class_names=classes), n=counts.n)
        return MetricRecord(_scalar_metrics(pooled_row))


class _CentralEvaluator:
    """Scores the global model on a coordinator-held test cache; saves checkpoints.

    A round's checkpoint is written by a background thread while the next round's
    messages go out (one save at a time; the next save, the round's report and the end of
    the run wait for it, and a failed save stops the run there).  The metrics files are
    written first, in the round itself, so a crash before the checkpoint is on disk
    resumes from the round before, whose metrics are all there.
    """

    def __init__(self, settings: Settings, metrics_log: MetricsLog, out_dir: Path,
                 strategy: FedradFedAvg, on_round: RoundCallback | None) -> None:
        self.settings = settings
        self.metrics_log = metrics_log
        self.out_dir = out_dir
        self.strategy = strategy
        self.on_round = on_round
        self.cache = load_cache(settings.central_eval_dir) if settings.central_eval_dir else None
        self.device = select_device("auto")
        self._saving: threading.Thread | None = None
        self._save_error: FedradError | None = None

    def wait_saved(self) -> None:
        """Wait for the checkpoint being written; raise if writing it failed."""
        if self._saving is not None:
            self._saving.join()
            self._saving = None
        if self._save_error is not None:
            err, self._save_error = self._save_error, None
            raise err

    def stop_saving(self) -> None:
        """After a failure: let a checkpoint being written finish (its error only logged)."""
        try:
            self.wait_saved()
        except FedradError as err:
            log.error("%s", err)

    def _save(self, server_round: int, state: dict[str, torch.Tensor], later: bool) -> None:
        s = self.settings
        self.wait_saved()
        payload = {"rng": capture_rng(), "strategy_state": self.strategy.aggregator.state_dict()}

        def write() -> None:
            try:
                save_checkpoint(self.out_dir, server_round, state, s.to_run_config(), **payload)
            except Exception as err:  # noqa: BLE001 - kept, and raised in the run's thread
                reason = (err.strerror or str(err)) if isinstance(err, OSError) else repr(err)
                self._save_error = FedradError(
                    "checkpoint-failed", f"round {server_round}'s checkpoint could not be "
                    f"written under {self.out_dir}: {reason}; free space or fix the "
                    "out-dir's permissions, then resume the run")
                return
            log.info("round %d/%d done: checkpoint saved%s", server_round, s.num_server_rounds,
                     "; the sites' evaluation of it comes with the next round's training"
                     if later else "")

        self._saving = threading.Thread(target=write, name=f"checkpoint-{server_round}",
                                        daemon=False)
        self._saving.start()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        s = self.settings
        state = state_dict_view(arrays)  # read-only views of the round's Arrays, not a copy
        result = None
        if self.cache is not None:
            model = model_from_settings(s, initialise=False)
            model.load_state_dict(state, strict=True)
            scores = predict_scores(model, np.asarray(self.cache.images), device=self.device,
                                    amp=s.amp, channels_last=s.channels_last)
            counts = count_outcomes(scores, np.asarray(self.cache.labels), bins=s.score_bins)
            row = pooled_metrics(counts, class_names=s.classes)
            self.metrics_log.record(server_round, "central", row, n=counts.n)
            result = MetricRecord(_scalar_metrics(row))
        # metrics first, then the checkpoint: a crash between the two resumes from the
        # round before, whose metrics are all on disk (later rows are dropped on resume)
        self.metrics_log.write()
        if server_round > 0:
            later = self.strategy.evaluation_follows(server_round)
            self._save(server_round, state, later)
            if not later:
                self.report(server_round)
        return result

    def report(self, server_round: int) -> None:
        """Log the round's metric table, update ``status.json`` and tell ``on_round``.

        Once the round's checkpoint is on disk: a report means the round is saved.
        """
        s = self.settings
        self.wait_saved()
        if server_round > 0:
            rows = self.metrics_log.round_rows(server_round)
            table = format_round_table(server_round, rows, s.classes)
            log.info("round %d/%d metrics\n%s", server_round, s.num_server_rounds, table)
            failures = self.strategy.round_failures.get(server_round, [])
            if self.strategy.status is not None:
                self.strategy.status.metrics(server_round, rows)
            if self.on_round is not None:
                self.on_round(RoundReport(server_round, s.num_server_rounds, rows, table,
                                          failures))


def initial_model(settings: Settings) -> torch.nn.Module:
    """The round-0 global model: seeded by ``seed``, or loaded from ``weights-path``."""
    torch.manual_seed(settings.seed)
    return model_from_settings(settings, weights_path=settings.weights_path or None)


def _resume_point(settings: Settings, out_dir: Path,
                  aggregator: Aggregator) -> tuple[int, ArrayRecord | None]:
    """The last completed round in ``out_dir`` and its global model (``resume = true``).

    The aggregator gets the checkpoint's strategy state back (a server optimiser's
    moments).
    """
    found = latest_checkpoint(out_dir)
    if found is None:
        log.warning("resume: no checkpoint in %s yet; starting from round 1", out_dir)
        return 0, None
    server_round, payload = found
    saved = payload.get("run_config", {})
    for key in ("model", "num-classes", "image-size", "stem", "strategy"):
        if key in saved and saved[key] != settings.to_run_config()[key]:
            raise ConfigError(
                f"resume: the checkpoint of round {server_round} in {out_dir} was made with "
                f"{key}={saved[key]!r}, this run has {key}={settings.to_run_config()[key]!r}; "
                "use the same setting, or a fresh out-dir"
            )
    if "strategy" in payload:
        aggregator.load_state_dict(payload["strategy"])
    if "rng" in payload:
        restore_rng(payload["rng"])
    log.info("resume: continuing after round %d of %d from %s", server_round,
             settings.num_server_rounds, out_dir)
    return server_round, ArrayRecord(payload["state_dict"])


def _history(out_dir: Path, settings: Settings, up_to: int) -> MetricsLog:
    """A metrics log holding the resumed run's rows up to round ``up_to``."""
    metrics_log = MetricsLog(out_dir, settings.classes)
    if up_to == 0 or not (out_dir / "metrics.json").is_file():
        return metrics_log
    saved = MetricsLog.load(out_dir)
    if saved.class_names != metrics_log.class_names:
        raise ConfigError(
            f"resume: {out_dir}/metrics.json has classes {saved.class_names}, this run has "
            f"{metrics_log.class_names}; use the same class-names, or a fresh out-dir"
        )
    for row in saved.rows():
        if row["round"] <= up_to:
            metrics_log.record(row["round"], row["scope"], row["metrics"], n=row["n"])
    return metrics_log


def run_federation(grid: Grid, settings: Settings,
                   on_round: RoundCallback | None = None, *,
                   run_id: int | None = None) -> MetricsLog:
    """Run ``settings.num_server_rounds`` rounds of ``settings.strategy`` on ``grid``.

    After every round the global model is saved under ``out-dir`` (with the server's
    random state) and the pooled, per-site and central metrics are printed and written as
    ``metrics.json`` and ``metrics.csv``; ``status.json`` follows every step and the log
    also goes to ``logs/server.jsonl``.  With ``resume = true`` the run continues after
    the last round saved in ``out-dir``: the same global model, metrics history and
    random state, and the sites are told the same round numbers, so a deterministic run
    ends with the model an uninterrupted one would have.
    """
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = attach_run_log(out_dir)
    status = StatusWriter(out_dir, num_rounds=settings.num_server_rounds, run_id=run_id)
    evaluator: _CentralEvaluator | None = None
    try:
        aggregator = Aggregator(settings)
        done, resumed = (_resume_point(settings, out_dir, aggregator) if settings.resume
                         else (0, None))
        metrics_log = _history(out_dir, settings, done)
        if done >= settings.num_server_rounds:
            log.info("resume: all %d rounds are already done in %s", done, out_dir)
            status.finish(message=f"all {done} rounds were already done")
            return metrics_log
        initial = resumed if resumed is not None else ArrayRecord(
            initial_model(settings).state_dict())
        strategy = FedradFedAvg(settings, metrics_log, aggregator)
        strategy.round_offset = done
        strategy.status = status
        evaluator = _CentralEvaluator(settings, metrics_log, out_dir, strategy, on_round)
        strategy.on_evaluated = evaluator.report
        started = time.perf_counter()
        log.info("strategy %s, %d rounds, secure aggregation %s", settings.strategy,
                 settings.num_server_rounds, "on" if settings.secure_aggregation else "off")
        if settings.secure_aggregation:
            _run_secure(grid, settings, strategy, evaluator, initial, start_round=done)
        else:
            def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
                if server_round == 0 and done:
                    return None  # the resumed model was evaluated when it was saved
                return evaluator(server_round + done, arrays)

            strategy.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=settings.num_server_rounds - done,
                train_config=ConfigRecord(settings.to_site_config()),
                evaluate_config=ConfigRecord(settings.to_site_config()),
                evaluate_fn=evaluate_fn,
                timeout=settings.round_timeout,
            )
        evaluator.wait_saved()  # the last round's checkpoint is on disk
        log.info("federated run finished in %.1f s; outputs in %s\n%s",
                 time.perf_counter() - started, out_dir, format_final_summary(metrics_log))
        status.finish()
        return metrics_log
    except BaseException as err:
        if evaluator is not None:
            evaluator.stop_saving()
        status.finish("failed", f"{type(err).__name__}: {err}")
        raise
    finally:
        logging.getLogger("fedrad").removeHandler(handler)
        handler.close()


def _run_secure(grid: Grid, settings: Settings, strategy: FedradFedAvg,
                evaluator: _CentralEvaluator, initial: ArrayRecord, *,
                start_round: int = 0) -> None:
    """The rounds under secure aggregation: same checkpoints, central and pooled rows."""
    log.info("secure aggregation on (SecAgg+): the server sees only sums; %d message round "
             "trips for %d rounds", trips_per_run(settings.num_server_rounds - start_round),
             settings.num_server_rounds - start_round)
    if start_round == 0:
        evaluator(0, initial)

    def pooled(server_round: int, row: dict[str, Any], n: int) -> None:
        strategy.metrics_log.record(server_round, "pooled", row, n=n)

    rounds = SecureRounds(grid, settings, on_failure=strategy.note_failure, on_pooled=pooled,
                          timeout=settings.round_timeout)
    rounds.status = strategy.status
    rounds.server_step = strategy.aggregator.server_step
    rounds.run(initial, after_round=evaluator, start_round=start_round)
    log.info("secure aggregation: %d message round trips", rounds.trips)


def _ensure_logging() -> None:
    logger = logging.getLogger("fedrad")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s fedrad: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def make_server_app(settings: Settings | None = None,
                    on_round: RoundCallback | None = None) -> ServerApp:
    """Build the ServerApp; ``settings`` default to the run config Flower passes in."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _ensure_logging()
        run_settings = settings or load_settings(context.run_config)
        run_federation(grid, run_settings, on_round, run_id=context.run_id)

    return server_app


os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
app = make_server_app()
