"""The server-side aggregation: a closed-form weighted mean and summed outcome counts."""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from fedrad.common.arrays import model_arrays
from fedrad.common.config import load_settings
from fedrad.common.metrics import (
    EVALUATE_RECEIVED,
    EVALUATION,
    count_outcomes,
    counts_to_metrics,
    merge_counts,
    pooled_metrics,
)
from fedrad.common.secagg.wire import ECHO
from fedrad.server.evaluator import MetricsLog
from fedrad.server.server_app import FedradFedAvg


def _reply(node: int, content: RecordDict | None = None, error: Error | None = None) -> Message:
    metadata = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="m", group_id="1", created_at=time.time(),
                        ttl=600.0, message_type="train")
    if error is not None:
        return Message(error=error, metadata=metadata)
    return Message(content=content, metadata=metadata)


def _strategy(tmp_path: Path, min_sites: int = 2) -> FedradFedAvg:
    settings = load_settings({"min-sites": min_sites, "class-names": "normal,opacity"})
    return FedradFedAvg(settings, MetricsLog(tmp_path, settings.classes))


def _train_reply(node: int, weight: np.ndarray, counter: int, n: int, loss: float) -> Message:
    arrays = ArrayRecord({"w": Array(weight.astype(np.float32)),
                          "bn.num_batches_tracked": Array(np.array(counter, dtype=np.int64))})
    return _reply(node, RecordDict({"arrays": arrays,
                                    "metrics": MetricRecord({"num-examples": n,
                                                             "train-loss": loss})}))


def test_aggregate_train_is_the_sample_weighted_mean(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(3, 4)) for _ in range(3)]
    counts = [10, 30, 60]
    replies = [_train_reply(i + 1, w, 5 * (i + 1), n, 0.1 * (i + 1))
               for i, (w, n) in enumerate(zip(weights, counts, strict=True))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = sum(w.astype(np.float32) * n for w, n in zip(weights, counts, strict=True)) / 100
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-5)
    assert arrays["w"].numpy().dtype == np.float32
    assert arrays["bn.num_batches_tracked"].numpy().dtype == np.int64
    assert metrics["num-examples"] == 100
    assert metrics["train-loss"] == pytest.approx((0.1 * 10 + 0.2 * 30 + 0.3 * 60) / 100)


def test_round_with_too_few_sites_keeps_the_model(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    failed = _reply(2, error=Error(code=0, reason="[no-usable-image] site site-2 ..."))
    arrays, metrics = strategy.aggregate_train(1, [_train_reply(1, np.ones((2, 2)), 1, 5, 0.5),
                                                   failed])
    assert arrays is None and metrics is None
    assert any("no-usable-image" in f for f in strategy.round_failures[1])


def test_failed_site_is_skipped_while_enough_remain(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    failed = _reply(3, error=Error(code=0, reason="[no-usable-image] site site-3"))
    replies = [_train_reply(1, np.zeros((2,)), 1, 10, 0.5),
               _train_reply(2, np.ones((2,)), 1, 30, 0.5), failed]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.75, 0.75])


def test_aggregate_evaluate_sums_counts_not_metrics(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    rng = np.random.default_rng(1)
    site_counts = []
    replies = []
    for node, n in ((1, 20), (2, 200)):
        labels = rng.integers(0, 2, n)
        p1 = np.clip(labels * 0.3 + rng.uniform(0, 0.7, n), 0, 1)
        scores = np.stack([1 - p1, p1], axis=1)
        counts = count_outcomes(scores, labels, bins=1000)
        site_counts.append(counts)
        replies.append(_reply(node, RecordDict({
            "metrics": MetricRecord({"num-examples": n, **counts_to_metrics(counts)}),
            "site": ConfigRecord({"site-id": f"site-{node}"}),
        })))
    result = strategy.aggregate_evaluate(1, replies)
    expected = pooled_metrics(merge_counts(site_counts), class_names=["normal", "opacity"])
    assert result["accuracy"] == pytest.approx(expected["accuracy"])
    assert result["auc"] == pytest.approx(expected["auc"])
    rows = strategy.metrics_log.round_rows(1)
    assert set(rows) == {"pooled", "site:site-1", "site:site-2"}
    assert rows["pooled"]["n"] == 220


def test_initial_global_model_depends_only_on_the_seed() -> None:
    import torch

    from fedrad.server.server_app import initial_model

    def state(seed: int) -> dict:
        return initial_model(load_settings({"seed": seed, "image-size": 32})).state_dict()

    a, b, c = state(7), state(7), state(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


class _Nodes:
    """The part of a Grid that FedAvg's configure_* uses."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return self.ids


@pytest.fixture()
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)  # what the ServerApp process sets


def _answer(msg: Message, weight: np.ndarray, n: int, *, echo=True) -> Message:
    msg.metadata.__dict__["_message_id"] = f"m{msg.metadata.dst_node_id}"
    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(weight.astype(np.float32)),
                               "bn.num_batches_tracked": Array(np.array(3, dtype=np.int64))}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5}),
    })
    if echo:
        content["fedrad-echo"] = ConfigRecord(dict(msg.content["fedrad-echo"]))
    return Message(content, reply_to=msg)


def _corrupt(code: str, msg: Message, stale: Message) -> Message:
    good = _answer(msg, np.full((2, 2), 9.0), 10)
    arrays = good.content["arrays"]
    if code == "non-finite":
        arrays["w"] = Array(np.full((2, 2), np.nan, np.float32))
    elif code == "wrong-shape":
        arrays["w"] = Array(np.zeros((3, 2), np.float32))
    elif code == "bad-dtype":
        arrays["w"] = Array(np.zeros((2, 2), np.float64))
    elif code == "oversized":
        arrays["extra"] = Array(np.zeros(200_000, np.float32))
    elif code == "malformed":
        del good.content["metrics"]
    elif code == "bad-num-examples":
        good.content["metrics"]["num-examples"] = -4
    elif code == "replayed":
        return _answer(stale, np.full((2, 2), 9.0), 10)
    return good


@pytest.mark.parametrize("code", ["non-finite", "wrong-shape", "bad-dtype", "oversized",
                                  "malformed", "bad-num-examples", "replayed"])
def test_plain_round_excludes_a_bad_reply_with_its_code(tmp_path: Path, task_identity,
                                                        code: str) -> None:
    strategy = _strategy(tmp_path)
    global_arrays = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32)),
                                 "bn.num_batches_tracked": Array(np.array(0, np.int64))})
    grid = _Nodes([11, 12, 13])
    # FedAvg samples the nodes in random order: pick each node's message by its id
    old = {m.metadata.dst_node_id: m
           for m in strategy.configure_train(1, global_arrays, ConfigRecord({}), grid)}
    messages = list(strategy.configure_train(2, global_arrays, ConfigRecord({}), grid))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = [_answer(by_node[11], np.zeros((2, 2)), 10),
               _answer(by_node[12], np.ones((2, 2)), 30),
               _corrupt(code, by_node[13], old[13])]
    arrays, metrics = strategy.aggregate_train(2, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 0.75))
    assert metrics["sites"] == 2
    assert any(f"[{code}]" in f and "node 13" in f for f in strategy.round_failures[2])


def test_plain_evaluate_rejects_a_reply_without_the_round_nonce(tmp_path: Path,
                                                                 task_identity) -> None:
    strategy = _strategy(tmp_path, min_sites=1)
    global_arrays = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})
    messages = list(strategy.configure_evaluate(1, global_arrays, ConfigRecord({}),
                                                _Nodes([1, 2])))
    rng = np.random.default_rng(3)
    replies = []
    for i, msg in enumerate(messages):
        msg.metadata.__dict__["_message_id"] = f"e{i}"
        labels = rng.integers(0, 2, 20)
        counts = count_outcomes(np.stack([1 - labels * 0.8, labels * 0.8], 1), labels, bins=1000)
        content = RecordDict({"metrics": MetricRecord({"num-examples": 20,
                                                       **counts_to_metrics(counts)})})
        if i == 0:
            content["fedrad-echo"] = ConfigRecord(dict(msg.content["fedrad-echo"]))
        replies.append(Message(content, reply_to=msg))
    result = strategy.aggregate_evaluate(1, replies)
    assert strategy.metrics_log.round_rows(1)["pooled"]["n"] == 20
    assert result is not None
    assert any("[malformed]" in f for f in strategy.round_failures[1])


def test_a_site_that_never_answers_is_recorded_and_superlink_errors_name_the_site(
        tmp_path: Path, monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)  # what the ServerApp process sets
    strategy = _strategy(tmp_path, min_sites=1)
    sent = []
    for node in (11, 12, 13):
        msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                      message_type="train")
        msg.metadata.__dict__["_message_id"] = f"m{node}"  # what the grid does when it sends
        sent.append(msg)
    strategy._stamp("train", 1, sent)
    answered = _train_reply(11, np.ones((2,)), 1, 10, 0.5)
    answered.metadata.__dict__["_reply_to_message_id"] = "m11"
    answered.content[ECHO] = ConfigRecord({"server-round": 1,
                                           "nonce": strategy._nonces[("train", 1)]})
    unavailable = _reply(1, error=Error(code=0, reason="Error: Node Unavailable"))
    unavailable.metadata.__dict__["_reply_to_message_id"] = "m12"  # the SuperLink answers
    arrays, _ = strategy.aggregate_train(1, [answered, unavailable])
    assert arrays is not None
    failures = strategy.round_failures[1]
    assert any("node 12 failed: Error: Node Unavailable" in f for f in failures), failures
    assert any("node 13 excluded: [no-reply]" in f for f in failures), failures
    assert not any("node 11" in f or "node 1 " in f for f in failures), failures


class _PushPullGrid:
    """Flower's grid API in-process for a plain round: sites answer in closed form.

    Each training reply is site ``i``'s model ``w = i`` with ``10 * i`` samples; ``late``
    nodes answer after ``late_s`` seconds; every reply is filed twice (a duplicate);
    ``pulled`` keeps a weak reference to every reply handed out, at most one per pull.
    """

    def __init__(self, ids: list[int], late: set[int] = frozenset(), late_s: float = 5.0):
        self.ids, self.late, self.late_s = ids, late, late_s
        self.pulled: list = []
        self._outbox: list[tuple[float, Message]] = []

    def get_node_ids(self) -> list[int]:
        return self.ids

    @staticmethod
    def _reply(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == "train":
            return _answer(msg, np.full((2, 2), float(node)), 10 * node)
        labels = np.arange(node) % 2
        counts = count_outcomes(np.stack([1 - labels, labels], 1).astype(float), labels,
                                bins=1000)
        return Message(RecordDict({
            "metrics": MetricRecord({"num-examples": node, **counts_to_metrics(counts)}),
            ECHO: ConfigRecord(dict(msg.content[ECHO]))}), reply_to=msg)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = f"{msg.metadata.message_type}-{node}"
            ready = time.monotonic() + (self.late_s if node in self.late else 0.0)
            self._outbox += [(ready, self._reply(msg)), (ready, self._reply(msg))]
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        wanted, now = set(message_ids), time.monotonic()
        for i, (ready, reply) in enumerate(self._outbox):
            if reply.metadata.reply_to_message_id in wanted and ready <= now:
                del self._outbox[i]
                self.pulled.append(weakref.ref(reply))
                return [reply]
        return []


def test_plain_rounds_add_each_reply_as_it_arrives(tmp_path: Path, task_identity,
                                                   monkeypatch) -> None:
    """FedAvg's loop over a push/pull grid: the closed-form mean, one reply held at a time,
    duplicates ignored, a reply after the timeout recorded as [no-reply]."""
    from fedrad.server.strategies import RunningMean

    strategy = _strategy(tmp_path)
    strategy.settings = load_settings({"min-sites": 2, "class-names": "normal,opacity",
                                       "round-timeout": 1})
    grid = _PushPullGrid([2, 3, 5, 7], late={7}, late_s=3600.0)
    alive: list[int] = []
    add = RunningMean.add

    def spy(self, weights, n):  # no gc.collect(): a dropped reply is freed at once
        alive.append(sum(ref() is not None for ref in grid.pulled))
        return add(self, weights, n)

    monkeypatch.setattr(RunningMean, "add", spy)
    initial = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32)),
                           "bn.num_batches_tracked": Array(np.array(0, np.int64))})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1, timeout=1.0)
    # sites 2, 3, 5 in time: sum(i * 10 i) / sum(10 i)
    expected = (2 * 20 + 3 * 30 + 5 * 50) / 100
    np.testing.assert_allclose(result.arrays["w"].numpy(), np.full((2, 2), expected),
                               rtol=1e-6)
    assert alive == [1, 1, 1]  # each model is added while it is the only reply held
    assert result.train_metrics_clientapp[1]["sites"] == 3
    failures = strategy.round_failures[1]
    assert sum("node 7 excluded: [no-reply]" in f for f in failures) == 2, failures  # both steps
    assert len(failures) == 2, failures  # the duplicates are never seen
    assert strategy.metrics_log.round_rows(1)["pooled"]["n"] == 2 + 3 + 5


def _counts_metrics(node: int, model_round: int) -> dict:
    """Closed-form evaluation counts of site ``node`` scoring the model of ``model_round``."""
    labels = np.arange(node + model_round) % 2
    scores = np.stack([1 - labels, labels], 1).astype(float)
    return {"num-examples": len(labels),
            **counts_to_metrics(count_outcomes(scores, labels, bins=1000))}


class _FoldingGrid(_PushPullGrid):
    """Sites that, when asked, score the received model (its ``w`` is its round) first."""

    def __init__(self, ids: list[int]) -> None:
        super().__init__(ids)
        self.sent: list[tuple[str, int]] = []

    def _reply(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        model_round = int(model_arrays(msg.content)["w"].numpy().flat[0])
        if msg.metadata.message_type == "evaluate":
            return Message(RecordDict({
                "metrics": MetricRecord(_counts_metrics(node, model_round)),
                ECHO: ConfigRecord(dict(msg.content[ECHO]))}), reply_to=msg)
        content = RecordDict({
            "arrays": ArrayRecord({
                "w": Array(np.full((2, 2), model_round + 1.0, np.float32)),
                "bn.num_batches_tracked": Array(np.array(3, dtype=np.int64))}),
            "metrics": MetricRecord({"num-examples": 10 * node, "train-loss": 0.5}),
            ECHO: ConfigRecord(dict(msg.content[ECHO]))})
        if msg.content["config"].get(EVALUATE_RECEIVED):
            content[EVALUATION] = MetricRecord(_counts_metrics(node, model_round))
        return Message(content, reply_to=msg)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.sent.append((msg.metadata.message_type, msg.metadata.dst_node_id))
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self._outbox.append((0.0, self._reply(msg)))
            ids.append(msg.metadata.message_id)
        return ids


def test_plain_rounds_evaluate_the_received_model_with_training(tmp_path: Path,
                                                                 task_identity) -> None:
    """evaluate-with-training: one model trip per site per round, every round's rows kept."""
    settings = load_settings({"min-sites": 2, "class-names": "normal,opacity",
                              "secure-aggregation": False, "num-server-rounds": 3,
                              "round-timeout": 5})
    strategy = FedradFedAvg(settings, MetricsLog(tmp_path, settings.classes))
    assert strategy.evaluates_with_training
    evaluated: list[int] = []
    strategy.on_evaluated = evaluated.append
    grid = _FoldingGrid([2, 3, 5])
    initial = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32)),
                           "bn.num_batches_tracked": Array(np.array(0, np.int64))})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=3, timeout=5.0)
    np.testing.assert_allclose(result.arrays["w"].numpy(), 3.0)  # each round adds one
    kinds = [kind for kind, _ in grid.sent]
    assert kinds == ["train"] * 9 + ["evaluate"] * 3  # 12 model trips, not 18
    assert evaluated == [0, 1, 2]  # the last round's rows come from its own evaluation
    log = strategy.metrics_log
    assert log.rounds() == [0, 1, 2, 3]
    for r in range(4):  # round r's rows score the model after round r, at every site
        rows = log.round_rows(r)
        assert set(rows) == {"pooled", "site:node-2", "site:node-3", "site:node-5"}, r
        assert rows["pooled"]["n"] == sum(node + r for node in (2, 3, 5))
        assert rows["site:node-5"]["n"] == 5 + r
    assert not strategy.round_failures


@pytest.mark.parametrize("change", [{"evaluate-with-training": False},
                                    {"fraction-train": 0.5}, {"secure-aggregation": True}])
def test_evaluation_rides_with_training_only_when_every_site_trains_in_plain_rounds(
        change: dict) -> None:
    settings = load_settings({"secure-aggregation": False, "min-sites": 1, **change})
    strategy = FedradFedAvg(settings, MetricsLog(Path("unused"), settings.classes))
    assert not strategy.evaluates_with_training
    assert not strategy.evaluation_follows(1)


def test_the_model_travels_packed_once_per_round_and_packed_replies_are_checked(
        tmp_path: Path, task_identity) -> None:
    from fedrad.common.arrays import LAYOUT, packed_content

    strategy = _strategy(tmp_path)
    global_arrays = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32)),
                                 "bn.num_batches_tracked": Array(np.array(0, np.int64))})
    grid = _Nodes([11, 12, 13])
    messages = list(strategy.configure_train(1, global_arrays, ConfigRecord({}), grid))
    assert all(LAYOUT in m.content.config_records for m in messages)
    assert len({id(m.content["arrays"]) for m in messages}) == 1  # packed once for all
    sent = model_arrays(messages[0].content)
    assert list(sent.keys()) == list(global_arrays.keys())
    assert all(sent[k].data == global_arrays[k].data for k in sent.keys())

    def packed(reply: Message, layout_fix: dict | None = None) -> Message:
        model = packed_content(reply.content["arrays"])
        if layout_fix:
            model[LAYOUT] = ConfigRecord({**dict(model[LAYOUT]), **layout_fix})
        for key, record in model.items():
            reply.content[key] = record
        return reply

    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = [packed(_answer(by_node[11], np.zeros((2, 2)), 10)),
               packed(_answer(by_node[12], np.ones((2, 2)), 30)),
               packed(_answer(by_node[13], np.full((2, 2), 9.0), 10), {"lengths": [1, 2]})]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 0.75))
    assert metrics["sites"] == 2
    assert any("[malformed]" in f and "node 13" in f and "packed" in f
               for f in strategy.round_failures[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_all_finite_finds_any_nan_or_infinity_and_passes_huge_finite_values(dtype) -> None:
    from fedrad.common.arrays import all_finite

    rng = np.random.default_rng(5)
    values = rng.normal(size=(64, 129)).astype(dtype)
    assert all_finite(values) and all_finite(values[:0]) and all_finite(np.array(1.5, dtype))
    for bad in (np.nan, np.inf, -np.inf):
        for at in ((0, 0), (31, 77), (63, 128)):
            broken = values.copy()
            broken[at] = bad
            assert not all_finite(broken), (bad, at)
        assert not all_finite(np.array(bad, dtype))
    huge = np.full((1000,), np.finfo(dtype).max / 2, dtype=dtype)  # squares overflow
    assert all_finite(huge)
    huge[500] = np.nan
    assert not all_finite(huge)
