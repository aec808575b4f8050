"""Secure aggregation over Flower messages: the real ClientApp handlers and ServerApp rounds.

An in-memory grid delivers each message to ``make_client_app()``'s handlers with one
persistent ``Context`` per site (as Flower does); the sites' training and evaluation are
replaced by closed-form fakes so that the expected FedAvg result is known exactly.
"""

from __future__ import annotations

import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

import fedrad.client.client_app as client_app_module
from fedrad.client.client_app import SiteContext, make_client_app
from fedrad.common.config import load_settings
from fedrad.common.errors import FedradError
from fedrad.common.metrics import count_outcomes, counts_to_metrics, merge_counts
from fedrad.common.secagg.wire import MASKED, RECORD
from fedrad.server.secure_rounds import SecureRounds, auto_threshold, trips_per_run

BIG = 2**63 + 12345  # Flower node ids are unsigned 64-bit: the protocol renumbers them
CLASSES = 2
BINS = 20

Tamper = Callable[[int, Message, Message], Message | None]


class FakeGrid:
    """Flower's grid API in-process: ``push_messages`` runs the sites' ClientApp at once and
    files its replies, ``pull_messages`` hands out those that are in.

    ``tamper`` may change or drop (return None) a reply; ``delay`` holds a node's replies
    back for that many seconds; ``duplicate`` files every reply twice; ``per_pull`` caps the
    replies one pull returns; ``pulled`` keeps a weak reference to every reply handed out.
    """

    def __init__(self, app, node_ids: list[int]) -> None:
        self.app = app
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": i},
                       state=RecordDict(), run_config={})
            for i, n in enumerate(node_ids)
        }
        self.tamper: Tamper | None = None
        self.sent: list[Message] = []
        self.delay: dict[int, float] = {}
        self.duplicate = False
        self.per_pull: int | None = None
        self.pulled: list[tuple[str, weakref.ref]] = []
        self._outbox: list[tuple[float, Message]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg.metadata.__dict__["_created_at"] = time.time()
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - Flower turns it into an error reply
                reply = Message(Error(code=0, reason=str(err)), reply_to=msg)
            if self.tamper is not None:
                reply = self.tamper(node, msg, reply)
            if reply is not None:
                ready = time.monotonic() + self.delay.get(node, 0.0)
                self._outbox += [(ready, reply)] * (2 if self.duplicate else 1)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        wanted, now = set(message_ids), time.monotonic()
        out, kept = [], []
        for ready, reply in self._outbox:
            if (reply.metadata.reply_to_message_id in wanted and ready <= now
                    and (self.per_pull is None or len(out) < self.per_pull)):
                out.append(reply)
                self.pulled.append((reply.metadata.message_type, weakref.ref(reply)))
            else:
                kept.append((ready, reply))
        self._outbox = kept
        return out


def _local_delta(site: int, server_round: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 * site + server_round)
    return {"w": rng.normal(0, 0.5, (3, 4)).astype(np.float32),
            "b": rng.normal(0, 0.5, (4,)).astype(np.float32),
            "bn.num_batches_tracked": np.array(3 + site, np.int64)}


SAMPLES = [12, 30, 50, 7, 21]
LOSSES = [0.9, 0.5, 0.7, 1.1, 0.3]


def _site_counts(site: int, server_round: int):
    rng = np.random.default_rng(1000 * site + server_round)
    n = 10 + 7 * site
    labels = rng.integers(0, CLASSES, n)
    p1 = np.clip(labels * 0.4 + rng.uniform(0, 0.6, n), 0, 1)
    return count_outcomes(np.stack([1 - p1, p1], axis=1), labels, bins=BINS)


@pytest.fixture()
def fake_sites(monkeypatch, tmp_path: Path):
    """Replace training and evaluation with closed forms; return the sites' mapping."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)  # what the ServerApp process sets

    def train_on_site(arrays, settings, site, server_round=1, **kwargs):
        i = int(site.site_id.split("-")[1])
        delta = _local_delta(i, server_round)
        local = {k: (v.numpy() + delta[k]).astype(v.numpy().dtype) for k, v in arrays.items()}
        metrics = {"num-examples": SAMPLES[i], "train-loss": LOSSES[i], "train-seconds": 0.0}
        return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in local.items()}), metrics

    def evaluate_on_site(arrays, settings, site, **kwargs):
        i = int(site.site_id.split("-")[1])
        counts = _site_counts(i, 1)
        return {"num-examples": counts.n, **counts_to_metrics(counts)}

    monkeypatch.setattr(client_app_module, "training_sample_count",
                        lambda settings, site: SAMPLES[int(site.site_id.split("-")[1])])
    monkeypatch.setattr(client_app_module, "train_on_site", train_on_site)
    monkeypatch.setattr(client_app_module, "evaluate_on_site", evaluate_on_site)
    return {i: SiteContext(f"site-{i}", tmp_path / f"site-{i}") for i in range(5)}


def _initial() -> ArrayRecord:
    rng = np.random.default_rng(7)
    return ArrayRecord({"w": Array(rng.normal(size=(3, 4)).astype(np.float32)),
                        "b": Array(rng.normal(size=(4,)).astype(np.float32)),
                        "bn.num_batches_tracked": Array(np.array(10, np.int64))})


def _settings(**extra):
    return load_settings({"num-classes": CLASSES, "score-bins": BINS, "min-sites": 2,
                          "num-server-rounds": 1, **extra})


def _run(grid: FakeGrid, settings, arrays: ArrayRecord | None = None, *,
         timeout: float = 0.5):
    """Run ``settings``' rounds; every reply is filed at push time, so ``timeout`` is only
    what a step waits for the replies a test drops."""
    failures: dict[int, list[str]] = {}
    pooled: dict[int, tuple[dict, int]] = {}
    after: dict[int, ArrayRecord] = {}
    rounds = SecureRounds(
        grid, settings,
        on_failure=lambda r, text: failures.setdefault(r, []).append(text),
        on_pooled=lambda r, row, n: pooled.__setitem__(r, (row, n)),
        timeout=timeout,
    )
    rounds.run(arrays or _initial(), after_round=lambda r, a: after.__setitem__(r, a))
    return rounds, failures, pooled, after


def _expected_mean(sites: list[int], server_round: int, start: ArrayRecord):
    w = np.array([SAMPLES[i] for i in sites], np.float64)
    out = {}
    for key, ref in start.items():
        ref = ref.numpy()
        locals_ = [(ref + _local_delta(i, server_round)[key]).astype(ref.dtype).astype(np.float64)
                   for i in sites]
        out[key] = sum(wi * x for wi, x in zip(w, locals_, strict=True)) / w.sum()
    return out


def _assert_close_to_fedavg(arrays: ArrayRecord, expected: dict, bound: float) -> None:
    for key, value in expected.items():
        got = arrays[key].numpy()
        assert got.dtype == _initial()[key].numpy().dtype
        if got.dtype.kind == "i":
            assert int(got) == int(np.rint(value))
        else:  # quantisation bound plus float32 rounding of the result
            np.testing.assert_allclose(got, value, rtol=0,
                                       atol=bound + 4 * np.finfo(np.float32).eps * 8)


def test_secure_round_equals_plain_fedavg_within_the_bound(fake_sites) -> None:
    nodes = [BIG + 3 * i for i in range(4)]
    grid = FakeGrid(make_client_app(fake_sites), nodes)
    rounds, failures, pooled, after = _run(grid, _settings(**{"num-server-rounds": 2}))
    assert failures == {}
    start = _initial()
    expected1 = _expected_mean([0, 1, 2, 3], 1, start)
    bound = rounds.train_metrics[1]["error-bound"]
    assert 0 < bound < 1e-6
    # round 2 starts from round 1's result; compare its update with the closed form
    _assert_close_to_fedavg(after[2], _expected_mean([0, 1, 2, 3], 2, after[1]), bound * 3)
    _assert_close_to_fedavg(after[1], expected1, bound)
    assert rounds.train_metrics[1]["num-examples"] == sum(SAMPLES[:4])
    expected_loss = np.dot(SAMPLES[:4], LOSSES[:4]) / sum(SAMPLES[:4])
    assert rounds.train_metrics[1]["train-loss"] == pytest.approx(expected_loss, abs=1e-6)
    # evaluation counts are summed exactly
    merged = merge_counts([_site_counts(i, 1) for i in range(4)])
    row, n = pooled[1]
    assert n == merged.n
    assert row["accuracy"] == pytest.approx(np.trace(merged.confusion) / merged.n)
    assert rounds.trips == trips_per_run(2)


def test_the_server_only_receives_masked_vectors(fake_sites) -> None:
    nodes = [BIG + i for i in range(3)]
    grid = FakeGrid(make_client_app(fake_sites), nodes)
    seen: list[RecordDict] = []

    def spy(node, msg, reply):
        seen.append(reply.content)
        return reply

    grid.tamper = spy
    _run(grid, _settings())
    for content in seen:
        assert "arrays" not in content and "metrics" not in content
        for name in content.array_records:
            assert name == MASKED
    masked = [c.array_records[MASKED][MASKED].numpy() for c in seen if MASKED in c]
    assert len(masked) == 9 and all(m.dtype == np.uint32 for m in masked)  # 3 sites x 3 steps
    # masked vectors look uniform, unlike small encoded updates or counts
    assert np.abs(masked[0].view(np.int32).astype(np.float64)).mean() > 2**28


def _drop_after_masking(victims: set[int], kind: str = "query") -> Tamper:
    """Sites in ``victims`` send their masked vector, then never answer again."""
    state = {"masked": set()}

    def tamper(node, msg, reply):
        if node in victims and msg.metadata.message_type == "train":
            state["masked"].add(node)
        if node in state["masked"] and msg.metadata.message_type.startswith(kind):
            return None
        return reply

    return tamper


@pytest.mark.parametrize("dropouts", [1, 2])
def test_dropouts_up_to_n_minus_t_still_give_the_right_sum(fake_sites, dropouts) -> None:
    nodes = [BIG + i for i in range(5)]
    assert 5 - auto_threshold(5) == 2
    grid = FakeGrid(make_client_app(fake_sites), nodes)
    grid.tamper = _drop_after_masking(set(nodes[:dropouts]))
    rounds, failures, pooled, after = _run(grid, _settings())
    # the dropped sites' inputs are in the sum: their self masks are rebuilt from shares
    _assert_close_to_fedavg(after[1], _expected_mean([0, 1, 2, 3, 4], 1, _initial()),
                            rounds.train_metrics[1]["error-bound"])
    assert any("no-reply" in f for f in failures[1])


def test_dropouts_before_masking_are_left_out_of_the_mean(fake_sites) -> None:
    nodes = [BIG + i for i in range(5)]
    grid = FakeGrid(make_client_app(fake_sites), nodes)

    def tamper(node, msg, reply):  # sites 0 and 1 fail to train
        if node in nodes[:2] and msg.metadata.message_type == "train":
            return None
        return reply

    grid.tamper = tamper
    rounds, failures, _, after = _run(grid, _settings())
    _assert_close_to_fedavg(after[1], _expected_mean([2, 3, 4], 1, _initial()),
                            rounds.train_metrics[1]["error-bound"])
    assert rounds.train_metrics[1]["num-examples"] == sum(SAMPLES[2:5])


def test_too_many_dropouts_fail_cleanly_and_the_next_round_proceeds(fake_sites) -> None:
    nodes = [BIG + i for i in range(5)]
    grid = FakeGrid(make_client_app(fake_sites), nodes)
    victims = set(nodes[:3])  # 3 > n - t = 2
    unmask_replies: list[RecordDict] = []

    def tamper(node, msg, reply):
        content = msg.content
        if (RECORD in content and "unmask-instance" in content[RECORD]
                and int(content[RECORD]["unmask-instance"]) == 1):
            if node in victims:
                return None
            unmask_replies.append(reply.content)
        return reply

    grid.tamper = tamper
    start = _initial()
    rounds, failures, pooled, after = _run(grid, _settings(**{"num-server-rounds": 2}), start)
    assert any("too-many-dropouts" in f and "discarded" in f for f in failures[1])
    # no partial sum: round 1 kept the initial model exactly
    for key in start.keys():
        np.testing.assert_array_equal(after[1][key].numpy(), start[key].numpy())
    assert 1 not in rounds.train_metrics
    # the two survivors revealed only self-mask shares, never a dropped site's key
    assert len(unmask_replies) == 2
    assert all(len(c[RECORD]["unmask-sk"]) == 0 for c in unmask_replies)
    # round 2 trains with fresh keys: the two sites that held keys for it (the others
    # missed that key exchange and rejoin one step later, for round 2's evaluation)
    assert rounds.train_metrics[2]["sites"] == 2
    _assert_close_to_fedavg(after[2], _expected_mean([3, 4], 2, start),
                            rounds.train_metrics[2]["error-bound"])
    merged = merge_counts([_site_counts(i, 1) for i in range(5)])
    assert pooled[2][1] == merged.n  # all five sites are back for round 2's evaluation


def _masked_array(reply: Message) -> np.ndarray:
    return reply.content.array_records[MASKED][MASKED].numpy()


def _replace_masked(reply: Message, value) -> Message:
    reply.content.array_records[MASKED][MASKED] = Array(value)
    return reply


CORRUPTIONS = {
    "truncated": lambda r: _replace_masked(r, _masked_array(r)[:-5]),
    "oversized": lambda r: _replace_masked(r, np.concatenate([_masked_array(r)] * 3)),
    "wrong-shape": lambda r: _replace_masked(r, _masked_array(r)[:-1].reshape(-1, 1)),
    "bad-dtype": lambda r: _replace_masked(r, _masked_array(r).astype(np.float32)),
    "malformed": lambda r: Message(RecordDict({"metrics": MetricRecord({"x": 1})}),
                                   reply_to=_ORIGINAL[0]),
}
_ORIGINAL: list[Message] = []


@pytest.mark.parametrize("code", [*CORRUPTIONS, "replayed", "non-finite"])
def test_a_bad_update_is_excluded_with_its_code_and_the_round_completes(
    fake_sites, monkeypatch, code
) -> None:
    nodes = [BIG + i for i in range(4)]
    bad = nodes[1]
    grid = FakeGrid(make_client_app(fake_sites), nodes)
    stale: dict[str, Message] = {}

    def tamper(node, msg, reply):
        if node != bad or msg.metadata.message_type != "train":
            return reply
        if code == "replayed":  # send round 1's reply again in round 2
            if "r1" not in stale:
                stale["r1"] = reply
                return reply
            old = stale["r1"]
            old.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
            return old
        if code in CORRUPTIONS:
            _ORIGINAL[:] = [msg]
            return CORRUPTIONS[code](reply)
        return reply

    if code == "non-finite":
        original = client_app_module.train_on_site

        def nan_training(arrays, settings, site, server_round=1, **kwargs):
            out, metrics = original(arrays, settings, site, server_round, **kwargs)
            if site.site_id == "site-1":
                values = out["w"].numpy().copy()
                values[0, 0] = np.nan
                out["w"] = Array(values)
            return out, metrics

        monkeypatch.setattr(client_app_module, "train_on_site", nan_training)
    grid.tamper = tamper
    rounds_n = 2 if code == "replayed" else 1
    rounds, failures, _, after = _run(grid, _settings(**{"num-server-rounds": rounds_n}))
    r = rounds_n
    assert any(f"[{code}]" in f and f"node {bad}" in f for f in failures[r]), failures
    good = [0, 2, 3]
    start = after[r - 1] if r > 1 else _initial()
    _assert_close_to_fedavg(after[r], _expected_mean(good, r, start),
                            rounds.train_metrics[r]["error-bound"])
    assert rounds.train_metrics[r]["sites"] == 3


def test_client_refuses_to_mask_nan(fake_sites) -> None:
    from fedrad.client.secure_client import mask_vector

    with pytest.raises(FedradError, match="NaN"):
        mask_vector({"work-instance": 1}, RecordDict(), np.array([1.0, np.nan]))


def test_secret_state_stays_in_context_and_never_in_replies(fake_sites) -> None:
    import json

    from fedrad.client.secure_client import STATE_RECORD

    nodes = [BIG + i for i in range(3)]
    grid = FakeGrid(make_client_app(fake_sites), nodes)
    sent: list[bytes] = []
    secrets: set[bytes] = set()

    def spy(node, msg, reply):
        for rec in reply.content.config_records.values():
            for value in rec.values():
                items = value if isinstance(value, list) else [value]
                sent.extend(bytes(v) for v in items if isinstance(v, bytes))
        state = grid.contexts[node].state
        if STATE_RECORD in state:  # what persists between messages (and processes)
            for blob in state[STATE_RECORD].values():
                stored = json.loads(bytes(blob))
                secrets.update(bytes.fromhex(stored[k]) for k in ("c_sk", "s_sk"))
                if stored["b"]:
                    secrets.add(bytes.fromhex(stored["b"]))
        return reply

    grid.tamper = spy
    _, failures, _, _ = _run(grid, _settings(**{"num-server-rounds": 2}))
    assert failures == {}
    assert len(secrets) >= 3 * 5 * 2  # every site, every step: two private keys
    blob = b"|".join(sent)
    assert sent and not any(secret in blob for secret in secrets)


def test_threshold_above_the_sites_is_a_clean_failure(fake_sites) -> None:
    grid = FakeGrid(make_client_app(fake_sites), [BIG, BIG + 1, BIG + 2])
    rounds, failures, pooled, after = _run(grid, _settings(**{"secagg-threshold": 5}))
    assert any("secagg-threshold=5" in f for f in failures[1])
    assert pooled == {}


def _write_site(path: Path, n: int, seed: int) -> Path:
    from fedrad.common.cache import write_cache

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 120, (n, 32, 32)).astype(np.uint8)
    images[labels == 1, 8:24, 8:24] += 100
    write_cache(path, images, labels, records=[{"id": f"i{i}", "label": int(v)}
                                               for i, v in enumerate(labels)],
                quarantine=[], meta={"num_classes": 2})
    return path


@pytest.mark.slow
def test_server_app_secure_run_matches_the_plain_run(tmp_path: Path, monkeypatch) -> None:
    """The real ClientApp and run_federation: checkpoints, metrics files, reports."""
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    from fedrad.server.checkpoint import load_checkpoint
    from fedrad.server.server_app import run_federation

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    torch.set_num_threads(1)
    sites = {i: SiteContext(f"site-{i}", _write_site(tmp_path / f"c{i}", 15 + 5 * i, i))
             for i in range(3)}
    outputs = {}
    reports = {}
    for secure in (False, True):
        settings = load_settings({"image-size": 32, "num-server-rounds": 1, "min-sites": 3,
                                  "batch-size": 8, "secure-aggregation": secure,
                                  "out-dir": str(tmp_path / f"out-{secure}")})
        grid = FakeGrid(make_client_app(sites, threads=1), [BIG + i for i in range(3)])
        got = []
        run_federation(grid, settings, on_round=got.append)
        outputs[secure], reports[secure] = Path(settings.out_dir), got
    plain = load_checkpoint(outputs[False] / "checkpoints" / "round-001.pt")["state_dict"]
    secure = load_checkpoint(outputs[True] / "checkpoints" / "round-001.pt")["state_dict"]
    for key, value in plain.items():
        assert secure[key].dtype == value.dtype and secure[key].shape == value.shape
        if value.is_floating_point():
            assert torch.allclose(secure[key], value, atol=2e-6, rtol=0), key
        else:
            assert torch.equal(secure[key], value), key
    assert set(reports[True][0].rows) == {"pooled"}
    assert {"pooled", "site:site-0", "site:site-1", "site:site-2"} == set(reports[False][0].rows)
    assert reports[True][0].rows["pooled"]["n"] == reports[False][0].rows["pooled"]["n"]
    assert reports[True][0].failures == [] and reports[False][0].failures == []
    text = (outputs[True] / "metrics.csv").read_text()
    assert "site:" not in text and "\n0,pooled," in text  # round-0 pooled row from the census


def test_secagg_plus_neighbourhoods_give_the_same_mean(fake_sites) -> None:
    nodes = [BIG + i for i in range(5)]
    grid = FakeGrid(make_client_app(fake_sites), nodes)
    grid.tamper = _drop_after_masking({nodes[2]})  # one dropout: t = 2 of 3 neighbours
    rounds, failures, pooled, after = _run(grid, _settings(**{"secagg-degree": 2}))
    shares = [m for m in grid.sent if RECORD in m.content and "share-params" in m.content[RECORD]]
    assert '"degree": 2' in str(shares[0].content[RECORD]["share-params"])
    _assert_close_to_fedavg(after[1], _expected_mean(list(range(5)), 1, _initial()),
                            rounds.train_metrics[1]["error-bound"])
    assert pooled[1][1] == merge_counts([_site_counts(i, 1) for i in range(5)
                                         if i != 2]).n  # site 2 is gone by evaluation


def test_each_masked_vector_is_summed_as_it_arrives_and_dropped(fake_sites,
                                                                 monkeypatch) -> None:
    """The server never holds two sites' replies at once (memory flat in the sites)."""
    from fedrad.common.secagg import SecAggServer

    nodes = [BIG + i for i in range(5)]
    grid = FakeGrid(make_client_app(fake_sites), nodes)
    grid.per_pull = 1
    alive: list[int] = []
    add = SecAggServer.add_masked_input

    def spy(self, node_id, masked):  # no gc.collect(): a dropped reply is freed at once
        alive.append(sum(ref() is not None for kind, ref in grid.pulled if kind == "train"))
        return add(self, node_id, masked)

    monkeypatch.setattr(SecAggServer, "add_masked_input", spy)
    rounds, failures, _, after = _run(grid, _settings())
    assert failures == {}
    assert len(alive) == 3 * 5  # round 0's evaluation, round 1's training and evaluation
    assert alive[5:10] == [1] * 5  # only the training reply being added is still held
    _assert_close_to_fedavg(after[1], _expected_mean(list(range(5)), 1, _initial()),
                            rounds.train_metrics[1]["error-bound"])


def test_duplicate_replies_are_ignored(fake_sites) -> None:
    nodes = [BIG + i for i in range(4)]
    grid = FakeGrid(make_client_app(fake_sites), nodes)
    grid.duplicate = True
    rounds, failures, pooled, after = _run(grid, _settings())
    assert failures == {}  # no duplicate-input exclusion: the second copy is never used
    _assert_close_to_fedavg(after[1], _expected_mean(list(range(4)), 1, _initial()),
                            rounds.train_metrics[1]["error-bound"])
    assert pooled[1][1] == merge_counts([_site_counts(i, 1) for i in range(4)]).n


def test_a_reply_after_the_timeout_counts_as_no_reply(fake_sites) -> None:
    nodes = [BIG + i for i in range(4)]
    late = nodes[0]
    grid = FakeGrid(make_client_app(fake_sites), nodes)

    def slow_training(node, msg, reply):
        grid.delay[late] = 5.0 if msg.metadata.message_type == "train" else 0.0
        return reply

    grid.tamper = slow_training
    started = time.monotonic()
    rounds, failures, _, after = _run(grid, _settings(), timeout=0.5)
    assert time.monotonic() - started < 4.0  # the stream stops waiting at the timeout
    assert any(f"node {late}" in f and "no-reply" in f for f in failures[1])
    _assert_close_to_fedavg(after[1], _expected_mean([1, 2, 3], 1, _initial()),
                            rounds.train_metrics[1]["error-bound"])
    assert rounds.train_metrics[1]["sites"] == 3
