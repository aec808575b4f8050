"""Aggregation strategies: closed forms, Flower's own implementations as references,
the sites' side of FedProx and FedBN, and the server optimiser's state across a resume."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdagrad, FedMedian, FedTrimmedAvg, FedYogi, Krum
from test_secure_rounds import BIG, FakeGrid, _write_site, fake_sites  # noqa: F401 - fixture

from fedrad.client import client_app as client_app_module
from fedrad.client.client_app import LOCAL_NORMS, SiteContext, make_client_app, train_on_site
from fedrad.common.config import STRATEGIES, load_settings
from fedrad.common.errors import ConfigError
from fedrad.common.models import model_from_settings, norm_state_keys
from fedrad.server.checkpoint import load_checkpoint
from fedrad.server.server_app import run_federation
from fedrad.server.strategies import Aggregator

RNG = np.random.default_rng(3)
CURRENT = {"w": RNG.normal(size=(4, 5)).astype(np.float32),
           "b": RNG.normal(size=(5,)).astype(np.float32),
           "bn.num_batches_tracked": np.array(10, np.int64)}
COUNTS = [10, 30, 60, 20, 5]


def _site_models(seed: int = 0, n: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"w": (CURRENT["w"] + rng.normal(0, 0.3, (4, 5))).astype(np.float32),
             "b": (CURRENT["b"] + rng.normal(0, 0.3, (5,))).astype(np.float32),
             "bn.num_batches_tracked": np.array(10 + 3 * i, np.int64)} for i in range(n)]


def _aggregator(strategy: str, **extra) -> Aggregator:
    secure = strategy not in ("median", "trimmed-mean", "krum")
    return Aggregator(load_settings({"strategy": strategy, "secure-aggregation": secure,
                                     **extra}))


def _flower_replies(models: list[dict[str, np.ndarray]]) -> list[Message]:
    out = []
    for i, (model, n) in enumerate(zip(models, COUNTS, strict=False)):
        metadata = Metadata(run_id=1, message_id=f"r{i}", src_node_id=i + 1, dst_node_id=0,
                            reply_to_message_id="m", group_id="1", created_at=time.time(),
                            ttl=600.0, message_type="train")
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v.astype(np.float64)) for k, v in model.items()
                                   if v.dtype.kind == "f"}),
            "metrics": MetricRecord({"num-examples": n})})
        out.append(Message(content=content, metadata=metadata))
    return out


def _flower(strategy, models, current=None) -> dict[str, np.ndarray]:
    if current is not None:
        strategy.current_arrays = {k: v.astype(np.float64) for k, v in current.items()
                                   if v.dtype.kind == "f"}
    arrays, _ = strategy.aggregate_train(1, _flower_replies(models))
    return {k: v.numpy() for k, v in arrays.items()}


def test_every_strategy_setting_has_an_aggregator() -> None:
    models = _site_models()
    for name in STRATEGIES:
        new = _aggregator(name).aggregate(CURRENT, list(zip(models, COUNTS, strict=True)))
        assert set(new) == set(CURRENT), name
        assert all(new[k].dtype == CURRENT[k].dtype for k in CURRENT), name
        assert all(new[k].shape == CURRENT[k].shape for k in CURRENT), name


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedbn"])
def test_mean_strategies_are_the_sample_weighted_mean(name: str) -> None:
    models = _site_models()
    new = _aggregator(name).aggregate(CURRENT, list(zip(models, COUNTS, strict=True)))
    total = sum(COUNTS)
    for key in ("w", "b"):
        expected = sum(m[key].astype(np.float64) * n for m, n in zip(models, COUNTS,
                                                                     strict=True)) / total
        np.testing.assert_allclose(new[key], expected, rtol=1e-6, atol=1e-7)
    counter = sum(int(m["bn.num_batches_tracked"]) * n for m, n in zip(models, COUNTS,
                                                                       strict=True)) / total
    assert int(new["bn.num_batches_tracked"]) == round(counter)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedbn"])
def test_a_server_step_below_one_moves_part_of_the_way_to_the_mean(name: str) -> None:
    pairs = list(zip(_site_models(), COUNTS, strict=True))
    mean = _aggregator(name).aggregate(CURRENT, pairs)
    damped = _aggregator(name, **{"server-step": 0.25})
    new = damped.aggregate(CURRENT, pairs)
    for key in ("w", "b"):
        x = CURRENT[key].astype(np.float64)
        np.testing.assert_allclose(new[key], x + 0.25 * (mean[key] - x), rtol=1e-6, atol=1e-7)
        assert new[key].dtype == np.float32
    assert int(new["bn.num_batches_tracked"]) == int(mean["bn.num_batches_tracked"])
    # A streamed round written into the next model's buffers gives the same values.
    running = damped.running_mean()
    for weights, n in pairs:
        running.add(weights, n)
    slots = {k: np.empty_like(v) for k, v in CURRENT.items()}
    into = damped.finish(CURRENT, running, into=slots)
    for key in CURRENT:
        np.testing.assert_array_equal(into[key], new[key])
    # Under secure aggregation the server step gets the mean the unmasked sum gives.
    stepped = damped.server_step(CURRENT, {k: v.astype(np.float64) for k, v in mean.items()})
    np.testing.assert_allclose(stepped["w"], new["w"], rtol=1e-6, atol=1e-7)


def test_server_step_is_refused_where_it_does_not_apply() -> None:
    with pytest.raises(ConfigError, match="server-step.*fedadam moves by server-learning-rate"):
        load_settings({"strategy": "fedadam", "server-step": 0.5})
    with pytest.raises(ConfigError, match="server-step.*median does not average"):
        load_settings({"strategy": "median", "secure-aggregation": False, "server-step": 0.5})
    with pytest.raises(ConfigError, match="server-step"):
        load_settings({"server-step": 0.0})


def test_running_mean_of_tensors_bigger_than_its_chunk_is_the_weighted_mean() -> None:
    """RunningMean adds large tensors a chunk at a time; every value must still count once."""
    from fedrad.server.strategies import ADD_CHUNK, RunningMean, weighted_mean

    rng = np.random.default_rng(11)
    size = 2 * ADD_CHUNK + 37  # two full chunks and a partial one
    sites = []
    for i in range(4):
        big = rng.normal(size=(size,)).astype(np.float32).reshape(1, -1)
        wide = rng.normal(size=(3, ADD_CHUNK)).astype(np.float32)
        if i == 2:
            wide = np.asfortranarray(wide)  # not C-contiguous: the chunks are copied views
        sites.append(({"big": big, "wide": wide, "n": np.array(i + 1, np.int64)},
                      float(COUNTS[i])))
    running = RunningMean()
    for weights, n in sites:
        running.add(weights, n)
    mean = running.mean()
    assert running.sites == 4
    for key in ("big", "wide", "n"):
        np.testing.assert_allclose(mean[key], weighted_mean(sites, key), rtol=1e-12,
                                   atol=1e-14)  # float64 sums; float32 would be off ~1e-7
        assert mean[key].shape == sites[0][0][key].shape
    bad = RunningMean()
    bad.add({"big": np.ones(size)}, 1)
    with pytest.raises(ValueError, match="broadcast"):
        bad.add({"big": np.ones(size - 1)}, 1)  # a mismatch is numpy's error, not a wrong sum


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_a_rounds_model_is_not_changed_by_the_next_rounds_sum(name: str) -> None:
    """The aggregator keeps its float64 sum for the next round; no model may alias it."""
    aggregator, fresh = _aggregator(name), _aggregator(name)
    first = aggregator.aggregate(CURRENT, list(zip(_site_models(1), COUNTS, strict=True)))
    kept = {k: v.copy() for k, v in first.items()}
    second = aggregator.aggregate(first, list(zip(_site_models(2), COUNTS, strict=True)))
    for k in CURRENT:
        np.testing.assert_array_equal(first[k], kept[k])  # round 1's model untouched
    expected = fresh.aggregate(CURRENT, list(zip(_site_models(1), COUNTS, strict=True)))
    fresh._spare = None  # the reference sums round 2 in fresh memory
    expected = fresh.aggregate(expected, list(zip(_site_models(2), COUNTS, strict=True)))
    for k in CURRENT:
        np.testing.assert_array_equal(second[k], expected[k])
        assert not np.shares_memory(second[k], first[k])


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam"])
def test_the_next_model_written_into_a_record_is_the_same_model(name: str) -> None:
    """finish(into=...) divides and casts the sum straight into the record's buffer; the
    model must be the very one the copying path gives, bit for bit, round after round."""
    from fedrad.common.arrays import array_values, record_to_fill

    direct, copying = _aggregator(name), _aggregator(name)
    current = {**CURRENT, "flag": np.array([True, False]), "half": np.ones(3, np.float16)}
    model_a = model_b = current
    for rnd in (1, 2, 3):  # later rounds reuse the kept float64 sums
        sites = []
        for i, m in enumerate(_site_models(rnd)):
            sites.append(({**m, "flag": np.array([i % 2 == 0, i > 2]),
                           "half": np.full(3, 1 + i / 3, np.float16)}, float(COUNTS[i])))
        running_a, running_b = direct.running_mean(), copying.running_mean()
        for weights, n in sites:
            running_a.add(weights, n)
            running_b.add(weights, n)
        record, slots = record_to_fill(model_a)
        returned = direct.finish(model_a, running_a, into=slots)
        expected = copying.finish(model_b, running_b)
        assert list(record.keys()) == list(current)
        for k in current:
            got = array_values(record[k])
            assert got.dtype == current[k].dtype and got.shape == current[k].shape
            np.testing.assert_array_equal(got, expected[k])
            assert np.shares_memory(returned[k], got)  # written in place, not copied
        model_a = {k: array_values(record[k]) for k in record.keys()}
        model_b = expected
    assert direct.steps == copying.steps


def test_median_and_trimmed_mean_match_flower_and_ignore_an_outlier() -> None:
    models = _site_models()
    models[4]["w"] = models[4]["w"] + 1000.0  # a broken or malicious site
    pairs = list(zip(models, COUNTS, strict=True))
    median = _aggregator("median").aggregate(CURRENT, pairs)
    trimmed = _aggregator("trimmed-mean", **{"trim-fraction": 0.2}).aggregate(CURRENT, pairs)
    ref_median = _flower(FedMedian(), models)
    ref_trimmed = _flower(FedTrimmedAvg(beta=0.2), models)
    for key in ("w", "b"):
        np.testing.assert_allclose(median[key], ref_median[key], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(trimmed[key], ref_trimmed[key], rtol=1e-6, atol=1e-6)
    honest = np.mean([m["w"] for m in models[:4]], axis=0)
    assert np.abs(median["w"] - honest).max() < 1.0
    assert np.abs(trimmed["w"] - honest).max() < 1.0
    mean = _aggregator("fedavg").aggregate(CURRENT, pairs)
    assert np.abs(mean["w"] - honest).max() > 10.0  # what plain FedAvg would have done


def test_krum_picks_an_honest_site_like_flower() -> None:
    models = _site_models(n=5)
    models[1] = {k: (v + 5.0).astype(v.dtype) if v.dtype.kind == "f" else v
                 for k, v in models[1].items()}
    agg = _aggregator("krum", **{"krum-byzantine": 1})
    new = agg.aggregate(CURRENT, list(zip(models, COUNTS, strict=True)))
    assert agg.last_selected != 1
    np.testing.assert_array_equal(new["w"], models[agg.last_selected]["w"])
    ref = _flower(Krum(num_malicious_nodes=1), models)
    np.testing.assert_allclose(new["w"], ref["w"], rtol=1e-6)


def test_fedadam_two_steps_in_closed_form() -> None:
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    agg = _aggregator("fedadam", **{"server-learning-rate": eta, "server-beta1": b1,
                                    "server-beta2": b2, "server-tau": tau})
    x = {k: v.copy() for k, v in CURRENT.items()}
    m = v = 0.0
    for step in (1, 2):
        models = _site_models(seed=step)
        mean = {k: sum(md[k].astype(np.float64) * n for md, n in zip(models, COUNTS,
                                                                     strict=True)) / sum(COUNTS)
                for k in ("w", "b")}
        delta = mean["w"] - x["w"]
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta ** 2
        lr = eta * np.sqrt(1 - b2 ** step) / (1 - b1 ** step)
        expected = x["w"] + lr * m / (np.sqrt(v) + tau)
        new = agg.aggregate(x, list(zip(models, COUNTS, strict=True)))
        np.testing.assert_allclose(new["w"], expected, rtol=1e-5, atol=1e-6)
        assert new["bn.num_batches_tracked"].dtype == np.int64
        x = new
    assert agg.steps == 2


@pytest.mark.parametrize("name,flower", [("fedyogi", FedYogi), ("fedadagrad", FedAdagrad)])
def test_yogi_and_adagrad_match_flower(name: str, flower) -> None:
    params = {"server-learning-rate": 0.05, "server-beta1": 0.0 if name == "fedadagrad"
              else 0.9, "server-beta2": 0.99, "server-tau": 1e-3}
    agg = _aggregator(name, **params)
    ref = (flower(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3) if name == "fedyogi"
           else flower(eta=0.05, tau=1e-3))
    x = {k: v.copy() for k, v in CURRENT.items()}
    for step in (1, 2):
        models = _site_models(seed=10 + step)
        expected = _flower(ref, models, current=x)
        x = agg.aggregate(x, list(zip(models, COUNTS, strict=True)))
        for key in ("w", "b"):
            np.testing.assert_allclose(x[key], expected[key], rtol=1e-4, atol=1e-5)


def test_server_optimiser_state_round_trips() -> None:
    first = _aggregator("fedadam")
    pairs = list(zip(_site_models(seed=1), COUNTS, strict=True))
    x1 = first.aggregate(CURRENT, pairs)
    restored = _aggregator("fedadam")
    restored.load_state_dict(first.state_dict())
    pairs2 = list(zip(_site_models(seed=2), COUNTS, strict=True))
    a, b = first.aggregate(x1, pairs2), restored.aggregate(x1, pairs2)
    for key in CURRENT:
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ConfigError, match="strategy='fedadam'"):
        _aggregator("fedyogi").load_state_dict(first.state_dict())


def test_robust_strategies_refuse_secure_aggregation() -> None:
    for name in ("median", "trimmed-mean", "krum"):
        with pytest.raises(ConfigError, match="secure-aggregation=false"):
            load_settings({"strategy": name})
    with pytest.raises(ConfigError, match="strategy"):
        load_settings({"strategy": "fedsgd"})


# --------------------------------------------------------------- the sites' side
SIZE = 32


def _site_settings(**extra):
    return load_settings({"image-size": SIZE, "batch-size": 8, "learning-rate": 0.05,
                          **extra})


def _distance(a: ArrayRecord, b: ArrayRecord) -> float:
    sa, sb = a.to_torch_state_dict(), b.to_torch_state_dict()
    return float(sum(((sa[k] - sb[k]).float() ** 2).sum() for k in sa
                     if sa[k].is_floating_point()) ** 0.5)


def test_fedprox_keeps_the_site_model_closer_to_the_global_one(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    site = SiteContext("site-a", _write_site(tmp_path / "cache", 40, 0))
    torch.manual_seed(0)
    start = ArrayRecord(model_from_settings(_site_settings()).state_dict())
    plain, _ = train_on_site(start, _site_settings(**{"local-epochs": 2}), site)
    prox, _ = train_on_site(start, _site_settings(**{"local-epochs": 2, "strategy": "fedprox",
                                                     "proximal-mu": 5.0}), site)
    assert _distance(prox, start) < 0.8 * _distance(plain, start)


def test_the_augment_setting_reaches_the_sites_training(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    site = SiteContext("site-a", _write_site(tmp_path / "cache", 40, 0))
    torch.manual_seed(0)
    start = ArrayRecord(model_from_settings(_site_settings()).state_dict())
    plain, m_plain = train_on_site(start, _site_settings(), site)
    aug, m_aug = train_on_site(start, _site_settings(augment="affine"), site)
    aug2, _ = train_on_site(start, _site_settings(augment="affine"), site)
    assert m_plain["train-loss"] != m_aug["train-loss"]
    assert _distance(aug, plain) > 0 and _distance(aug, aug2) == 0.0


def test_local_steps_and_logit_adjust_reach_the_sites_training(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    site = SiteContext("site-a", _write_site(tmp_path / "cache", 40, 0))  # 32 train: 4 batches
    torch.manual_seed(0)
    start = ArrayRecord(model_from_settings(_site_settings()).state_dict())
    epochs2, _ = train_on_site(start, _site_settings(**{"local-epochs": 2}), site)
    steps8, _ = train_on_site(start, _site_settings(**{"local-steps": 8}), site)
    steps3, _ = train_on_site(start, _site_settings(**{"local-steps": 3, "local-epochs": 2}),
                              site)
    assert _distance(epochs2, steps8) == 0.0  # 8 steps are the two passes
    assert _distance(steps3, steps8) > 0
    _, plain = train_on_site(start, _site_settings(), site)
    _, adjusted = train_on_site(start, _site_settings(**{"logit-adjust": 1.0}), site)
    assert plain["train-loss"] != adjusted["train-loss"]
    with pytest.raises(ConfigError, match="local-steps"):
        _site_settings(**{"local-steps": -1})
    with pytest.raises(ConfigError, match="logit-adjust"):
        _site_settings(**{"logit-adjust": -0.5})


def test_a_fedbn_site_with_dp_keeps_its_trained_norms_not_the_noised_ones(
        tmp_path: Path, monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    torch.set_num_threads(1)
    base = {"strategy": "fedbn", "secure-aggregation": False}
    plain_settings = _site_settings(**base)
    dp_settings = _site_settings(**base, **{"dp-noise-multiplier": 1.0, "dp-clip": 0.5})
    torch.manual_seed(0)
    global_model = ArrayRecord(model_from_settings(plain_settings).state_dict())
    norm_keys = set(norm_state_keys(model_from_settings(plain_settings)))
    kept = {}
    for label, settings in (("plain", plain_settings), ("dp", dp_settings)):
        app = make_client_app({0: SiteContext("site-a", _write_site(tmp_path / label, 40, 0))})
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                          state=RecordDict(), run_config={})
        reply = app(_train_message(global_model, settings, 1), context)
        kept[label] = {k: context.state[LOCAL_NORMS][k].numpy() for k in norm_keys}
        kept[label + "-sent"] = {k: reply.content["arrays"][k].numpy() for k in norm_keys}
    noised = [k for k in norm_keys
              if not np.array_equal(kept["dp-sent"][k], kept["plain-sent"][k])]
    assert noised  # DP changed what was sent ...
    for key in norm_keys:  # ... but not what the site keeps: the same training, unnoised
        np.testing.assert_array_equal(kept["dp"][key], kept["plain"][key])


def _train_message(arrays: ArrayRecord, settings, server_round: int, kind: str = "train"):
    config = ConfigRecord({**settings.to_site_config(), "server-round": server_round})
    return Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=1,
                   message_type=kind)


def test_fedbn_site_keeps_its_normalisation_layers(tmp_path: Path, monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)  # what the ClientApp process sets
    torch.set_num_threads(1)
    settings = _site_settings(strategy="fedbn", **{"secure-aggregation": False})
    app = make_client_app({0: SiteContext("site-a", _write_site(tmp_path / "cache", 40, 0))})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                      state=RecordDict(), run_config={})
    torch.manual_seed(0)
    global_model = ArrayRecord(model_from_settings(settings).state_dict())
    norm_keys = set(norm_state_keys(model_from_settings(settings)))
    reply = app(_train_message(global_model, settings, 1), context)
    sent = reply.content["arrays"]
    kept = context.state[LOCAL_NORMS]
    assert set(kept.keys()) == norm_keys
    for key in norm_keys:  # the site keeps exactly the norms it trained
        np.testing.assert_array_equal(kept[key].numpy(), sent[key].numpy())
    # round 2 from a new global model: the site trains from its own norms, not the global ones
    calls = []
    real = client_app_module.train_on_site

    def spy(arrays, s, site, server_round=1, **kwargs):
        calls.append(kwargs.get("local_norms"))
        return real(arrays, s, site, server_round, **kwargs)

    client_app_module.train_on_site = spy
    try:
        app(_train_message(global_model, settings, 2), context)
    finally:
        client_app_module.train_on_site = real
    assert set(calls[0]) == norm_keys
    for key in norm_keys:
        np.testing.assert_array_equal(calls[0][key], sent[key].numpy())
    # plain FedAvg keeps nothing at the site
    plain_context = Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                            state=RecordDict(), run_config={})
    app(_train_message(global_model, _site_settings(**{"secure-aggregation": False}), 1),
        plain_context)
    assert LOCAL_NORMS not in plain_context.state


# --------------------------------------------------- server optimiser and resume
def test_fedadam_state_is_checkpointed_and_resumed(fake_sites, tmp_path: Path,  # noqa: F811
                                                   monkeypatch) -> None:
    """Two rounds straight == one round, a crash, and a resumed second round (secure)."""
    import fedrad.server.server_app as server_app

    def run(out: Path, rounds: int, resume: bool = False):
        settings = load_settings({"num-classes": 2, "score-bins": 20, "min-sites": 2,
                                  "num-server-rounds": rounds, "strategy": "fedadam",
                                  "server-learning-rate": 0.05, "out-dir": str(out),
                                  "resume": resume})
        grid = FakeGrid(make_client_app(fake_sites), [BIG + i for i in range(3)])
        run_federation(grid, settings)

    initial = {"w": Array(RNG.normal(size=(3, 4)).astype(np.float32)),
               "b": Array(RNG.normal(size=(4,)).astype(np.float32)),
               "bn.num_batches_tracked": Array(np.array(10, np.int64))}

    class Tiny(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return {k: torch.from_numpy(v.numpy().copy()) for k, v in initial.items()}

    monkeypatch.setattr(server_app, "initial_model", lambda settings: Tiny())
    run(tmp_path / "straight", 2)
    run(tmp_path / "resumed", 1)
    first = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "round-001.pt")
    assert first["strategy"]["strategy"] == "fedadam" and first["strategy"]["steps"] == 1
    assert set(first["strategy"]["m"]) == {"w", "b"}
    run(tmp_path / "resumed", 2, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "round-002.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "round-002.pt")
    assert b["strategy"]["steps"] == 2
    for key in ("w", "b"):  # the same masks' quantisation on both paths: equal to 1e-6
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], atol=1e-6,
                                   rtol=0)
