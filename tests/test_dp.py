"""Differential privacy: clipping, noise, the RDP accountant and the site's privacy ledger."""

from __future__ import annotations

import json
import math
import os
import threading
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad.client.privacy import (
    PrivacyLedger,
    SitePrivacy,
    check_privacy_budget,
    ledger_text,
    privatize_update,
)
from fedrad.common.config import load_settings
from fedrad.common.dp import (
    ORDERS,
    GaussianRound,
    RdpAccountant,
    add_gaussian_noise,
    clip_update,
    epsilon_from_rdp,
    gaussian_epsilon,
    gaussian_rdp,
    privatize_state,
    update_norm,
)
from fedrad.common.errors import ConfigError, FedradError


def _states(seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    glob = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.running_var": torch.rand(8, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "fc.weight": torch.randn(2, 8, generator=g),
    }
    new = {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point()
               else v + 3) for k, v in glob.items()}
    return glob, new


# --------------------------------------------------------------------------- mechanism


def test_clip_bounds_the_update_norm_and_keeps_its_direction() -> None:
    glob, new = _states(scale=2.0)
    before = update_norm(glob, new)
    assert before > 5.0
    result = clip_update(glob, new, 0.5)
    assert result.norm == pytest.approx(before)
    assert result.scale == pytest.approx(0.5 / before)
    assert update_norm(glob, result.state) == pytest.approx(0.5, rel=1e-6)
    for key in ("conv.weight", "fc.weight"):
        u, c = new[key] - glob[key], result.state[key] - glob[key]
        assert torch.allclose(c, u * result.scale, atol=1e-6)
        assert result.state[key].dtype == new[key].dtype


def test_small_updates_are_not_clipped() -> None:
    glob, new = _states(scale=1e-3)
    result = clip_update(glob, new, 10.0)
    assert result.scale == 1.0
    assert all(torch.equal(result.state[k], new[k]) for k in new)


def test_integer_buffers_pass_through_untouched() -> None:
    glob, new = _states(scale=2.0)
    release = privatize_state(glob, new, clip=0.1, noise_multiplier=3.0)
    out = release.state["bn.num_batches_tracked"]
    assert out.dtype == torch.int64 and int(out) == int(new["bn.num_batches_tracked"]) == 10
    assert update_norm(glob, release.state) > 0.1  # noise was added to the float tensors


def test_noise_std_matches_sigma_times_clip() -> None:
    n = 400_000
    glob = {"w": torch.zeros(n), "b": torch.ones(n // 4, dtype=torch.float64)}
    sigma, clip = 1.5, 0.4
    release = privatize_state(glob, dict(glob), clip=clip, noise_multiplier=sigma)
    noise = torch.cat([release.state["w"].double(), release.state["b"] - 1.0])
    std = float(noise.std())
    # the sample std of m normal draws has standard error std / sqrt(2 m): 1 % is ~9 errors
    assert std == pytest.approx(sigma * clip, rel=0.01)
    assert abs(float(noise.mean())) < 5 * sigma * clip / math.sqrt(noise.numel())
    assert release.noise_std == pytest.approx(0.6)
    assert release.state["b"].dtype == torch.float64


def test_noise_is_fresh_each_release_unless_a_generator_is_given() -> None:
    glob = {"w": torch.zeros(1000)}
    a = add_gaussian_noise(glob, 1.0)["w"]
    b = add_gaussian_noise(glob, 1.0)["w"]
    assert not torch.equal(a, b)
    c = add_gaussian_noise(glob, 1.0, generator=torch.Generator().manual_seed(5))["w"]
    d = add_gaussian_noise(glob, 1.0, generator=torch.Generator().manual_seed(5))["w"]
    assert torch.equal(c, d)


def test_running_variances_stay_nonnegative() -> None:
    glob, new = _states()
    release = privatize_state(glob, new, clip=1.0, noise_multiplier=50.0)
    assert float(release.state["bn.running_var"].min()) >= 0.0
    assert float(release.state["bn.running_mean"].min()) < 0.0  # other floats are not clamped


def test_mismatched_states_are_rejected() -> None:
    glob, new = _states()
    new.pop("fc.weight")
    with pytest.raises(ValueError, match="different tensors"):
        clip_update(glob, new, 1.0)
    with pytest.raises(ValueError, match="clip"):
        clip_update(*_states(), 0.0)


# --------------------------------------------------------------------------- accountant


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _exact_delta(eps: float, mu: float) -> float:
    """delta(eps) of the Gaussian mechanism with sensitivity / std = mu (Balle & Wang 2018)."""
    return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)


def _exact_epsilon(mu: float, delta: float) -> float:
    lo, hi = 0.0, 500.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _exact_delta(mid, mu) > delta else (lo, mid)
    return hi


def test_rdp_of_the_gaussian_is_the_closed_form() -> None:
    orders = np.array([1.5, 2.0, 10.0, 64.0])
    assert np.allclose(gaussian_rdp(2.0, orders), orders / 8.0)
    assert np.allclose(gaussian_rdp(2.0, orders, sensitivity=2.0), orders / 2.0)
    assert np.isinf(gaussian_rdp(0.0, orders)).all()


@pytest.mark.parametrize(("sigma", "rounds", "delta"),
                         [(1.0, 1, 1e-5), (1.0, 10, 1e-5), (5.0, 100, 1e-6), (0.7, 5, 1e-3)])
def test_standard_conversion_matches_the_closed_form(sigma, rounds, delta) -> None:
    # R(a) = rho * a, so min_a rho a + log(1/delta)/(a-1) = rho + 2 sqrt(rho log(1/delta))
    rho = rounds / (2 * sigma**2)
    expected = rho + 2 * math.sqrt(rho * math.log(1 / delta))
    got = gaussian_epsilon([sigma] * rounds, delta, conversion="standard")
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (1.0, 10), (2.0, 50), (5.0, 100),
                                                (10.0, 1)])
def test_epsilon_is_sound_and_close_to_the_exact_gaussian_curve(sigma, rounds) -> None:
    # T Gaussian releases compose exactly into one with mu = sqrt(T) / sigma
    delta = 1e-5
    mu = math.sqrt(rounds) / sigma
    eps = gaussian_epsilon([sigma] * rounds, delta)
    assert _exact_delta(eps, mu) <= delta  # a valid (eps, delta) guarantee
    assert 1.0 <= eps / _exact_epsilon(mu, delta) < 1.15  # RDP is loose, but not by much
    assert eps < gaussian_epsilon([sigma] * rounds, delta, conversion="standard")


def test_epsilon_matches_opacus_rdp_accountant() -> None:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    for sigma, steps, delta in [(1.0, 1, 1e-5), (1.1, 30, 1e-5), (4.0, 200, 1e-6)]:
        theirs = compute_rdp(q=1.0, noise_multiplier=sigma, steps=steps, orders=orders)
        ours = RdpAccountant(orders=np.array(orders, dtype=float),
                             rounds=[GaussianRound(sigma)] * steps)
        assert np.allclose(ours.rdp(), theirs, rtol=1e-12)
        eps_theirs, _ = get_privacy_spent(orders=orders, rdp=theirs, delta=delta)
        assert ours.epsilon(delta) == pytest.approx(eps_theirs, rel=1e-9)
        # the default, denser order grid can only be tighter, and not by much
        dense = gaussian_epsilon([sigma] * steps, delta)
        assert eps_theirs * 0.99 < dense <= eps_theirs + 1e-12


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    by_rounds = [gaussian_epsilon([1.2] * t, 1e-5) for t in range(1, 8)]
    assert all(a < b for a, b in pairwise(by_rounds))
    by_sigma = [gaussian_epsilon([s], 1e-5) for s in (0.5, 1, 2, 4, 8)]
    assert all(a > b for a, b in pairwise(by_sigma))
    assert gaussian_epsilon([1.0], 1e-7) > gaussian_epsilon([1.0], 1e-5)
    # replace-one (sensitivity 2C) costs what add-remove costs at half the noise
    assert gaussian_epsilon([2.0], 1e-5, sensitivity=2.0) == pytest.approx(
        gaussian_epsilon([1.0], 1e-5))
    assert RdpAccountant().epsilon(1e-5) == 0.0
    assert math.isinf(gaussian_epsilon([0.0], 1e-5))
    with pytest.raises(ValueError, match="delta"):
        epsilon_from_rdp(gaussian_rdp(1.0), 0.0, ORDERS)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("key", "value", "match"), [
    ("dp-noise-multiplier", -1, ">= 0.0"),
    ("dp-noise-multiplier", "nan", "finite"),
    ("dp-clip", 0, "'dp-clip' must be > 0"),
    ("dp-delta", 0, "'dp-delta' must be > 0"),
    ("dp-delta", 0.5, "<= 0.1"),
    ("dp-clip", "one", "must be a number"),
])
def test_bad_dp_settings_are_clear_errors(key, value, match) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings({key: value})


def test_site_privacy_from_node_config() -> None:
    p = SitePrivacy.from_node_config({"privacy-budget": "8", "privacy-ledger": "/x/l.json",
                                      "privacy-neighbouring": "replace"})
    assert (p.budget, p.ledger, p.neighbouring) == (8.0, Path("/x/l.json"), "replace")
    assert SitePrivacy.from_node_config({}).ledger_path(Path("/d")) == Path(
        "/d/privacy-ledger.json")
    with pytest.raises(ConfigError, match="privacy-budget"):
        SitePrivacy.from_node_config({"privacy-budget": "lots"})
    with pytest.raises(ConfigError, match="privacy-budget"):
        SitePrivacy.from_node_config({"privacy-budget": -2})
    with pytest.raises(ConfigError, match="add-remove, replace"):
        SitePrivacy.from_node_config({"privacy-neighbouring": "record"})


# --------------------------------------------------------------------------- ledger


class _Site:
    def __init__(self, data_dir: Path, budget: float | None = None, **kw) -> None:
        self.site_id = "site-a"
        self.data_dir = data_dir
        self.privacy = SitePrivacy(budget=budget, **kw)


DP = load_settings({"dp-noise-multiplier": 2.0, "dp-clip": 0.5, "dp-delta": 1e-5})


def _round(site, run_id, rnd, settings=DP, seed=0):
    glob, new = _states(seed)
    return privatize_update(glob, new, settings, site, run_id, rnd)


def test_ledger_accumulates_over_rounds_and_runs(tmp_path: Path) -> None:
    site = _Site(tmp_path)
    for rnd in (1, 2, 3):
        _, metrics = _round(site, 11, rnd)
        assert metrics["dp-epsilon-run"] == pytest.approx(gaussian_epsilon([2.0] * rnd, 1e-5))
        assert metrics["dp-epsilon-round"] == pytest.approx(gaussian_epsilon([2.0], 1e-5))
    _, metrics = _round(site, 12, 1, settings=DP.replace(dp_noise_multiplier=4.0))
    assert metrics["dp-epsilon-run"] == pytest.approx(gaussian_epsilon([4.0], 1e-5))
    assert set(metrics) == {"dp-epsilon-round", "dp-epsilon-run"}

    entries = PrivacyLedger(tmp_path / "privacy-ledger.json").entries()
    assert [(e.run_id, e.server_round) for e in entries] == [("11", 1), ("11", 2), ("11", 3),
                                                            ("12", 1)]
    assert entries[-1].epsilon_total == pytest.approx(
        gaussian_epsilon([2.0, 2.0, 2.0, 4.0], 1e-5))
    assert entries[-1].epsilon_run < entries[-2].epsilon_run < entries[-1].epsilon_total
    assert all(e.clip == 0.5 and e.delta == 1e-5 for e in entries)
    raw = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert raw["site-id"] == "site-a" and len(raw["entries"]) == 4


def test_total_uses_the_smallest_delta_in_the_ledger(tmp_path: Path) -> None:
    site = _Site(tmp_path)
    _round(site, 1, 1, settings=DP.replace(dp_delta=1e-8))
    _round(site, 2, 1, settings=DP.replace(dp_delta=0.05))  # a loose delta cannot lower it
    last = PrivacyLedger(tmp_path / "privacy-ledger.json").entries()[-1]
    assert last.delta_total == 1e-8
    assert last.epsilon_total == pytest.approx(gaussian_epsilon([2.0, 2.0], 1e-8))


def test_replace_relation_is_accounted_at_twice_the_sensitivity(tmp_path: Path) -> None:
    site = _Site(tmp_path, neighbouring="replace")
    _, metrics = _round(site, 1, 1)
    assert metrics["dp-epsilon-round"] == pytest.approx(gaussian_epsilon([1.0], 1e-5))


def test_a_round_over_budget_is_refused_and_not_recorded(tmp_path: Path) -> None:
    budget = (gaussian_epsilon([2.0] * 2, 1e-5) + gaussian_epsilon([2.0] * 3, 1e-5)) / 2
    secret = tmp_path / "Doe_John"
    site = _Site(secret, budget=budget)
    _round(site, 5, 1)
    _round(site, 5, 2)
    ledger_file = secret / "privacy-ledger.json"
    before = ledger_file.read_bytes()
    for attempt in (lambda: check_privacy_budget(DP, site, 5, 3), lambda: _round(site, 5, 3)):
        with pytest.raises(FedradError) as info:
            attempt()
        err = info.value
        assert err.code == "privacy-budget-exceeded"
        text = str(err)
        assert f"{budget:g}" in text and "privacy-budget=" in text
        assert f"{gaussian_epsilon([2.0] * 2, 1e-5):.3g}" in text  # already spent
        assert f"{gaussian_epsilon([2.0] * 3, 1e-5):.3g}" in text  # total it would reach
        assert str(tmp_path) not in text and "Doe_John" not in text
    assert ledger_file.read_bytes() == before
    # more noise fits in what is left
    _, metrics = _round(site, 5, 3, settings=DP.replace(dp_noise_multiplier=50.0))
    assert metrics["dp-epsilon-round"] < 0.5


def test_a_site_with_a_budget_refuses_rounds_without_dp(tmp_path: Path) -> None:
    site = _Site(tmp_path, budget=10.0)
    off = DP.replace(dp_noise_multiplier=0.0)
    with pytest.raises(FedradError, match="dp-noise-multiplier") as info:
        check_privacy_budget(off, site, 1, 1)
    assert info.value.code == "privacy-dp-required"
    with pytest.raises(FedradError, match="privacy-dp-required"):
        _round(site, 1, 1, settings=off)


def test_without_dp_and_without_budget_nothing_changes(tmp_path: Path) -> None:
    glob, new = _states()
    calls = []
    state, metrics = privatize_update(lambda: calls.append(1) or glob, new,
                                      DP.replace(dp_noise_multiplier=0.0), _Site(tmp_path), 1, 1)
    assert metrics == {} and calls == []
    assert all(torch.equal(state[k], new[k]) for k in new)
    assert not (tmp_path / "privacy-ledger.json").exists()


@pytest.mark.parametrize("content", [
    "{not json",
    '{"format": "something-else", "version": 1, "entries": []}',
    '{"format": "fedrad-privacy-ledger", "version": 1, "entries": [{"run-id": "1"}]}',
    "",
])
def test_a_corrupt_ledger_is_an_error_never_a_reset(tmp_path: Path, content: str) -> None:
    ledger_file = tmp_path / "privacy-ledger.json"
    ledger_file.write_text(content)
    with pytest.raises(FedradError) as info:
        _round(_Site(tmp_path), 1, 1)
    assert info.value.code == "privacy-ledger-corrupt"
    assert "never reset" in str(info.value) and str(tmp_path) not in str(info.value)
    assert str(ledger_file) in (info.value.local_detail or "")
    assert ledger_file.read_text() == content


def test_an_entry_with_a_bad_value_is_corrupt(tmp_path: Path) -> None:
    _round(_Site(tmp_path), 1, 1)
    path = tmp_path / "privacy-ledger.json"
    raw = json.loads(path.read_text())
    raw["entries"][0]["noise-multiplier"] = -1
    path.write_text(json.dumps(raw))
    with pytest.raises(FedradError, match="entry 1"):
        PrivacyLedger(path).entries()


def test_ledger_writes_are_atomic(tmp_path: Path, monkeypatch) -> None:
    site = _Site(tmp_path)
    _round(site, 1, 1)
    path = tmp_path / "privacy-ledger.json"
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    for target in ("os.replace", "json.dump"):
        with monkeypatch.context() as m:
            m.setattr(target, crash)
            with pytest.raises(FedradError) as info:
                _round(site, 1, 2)
            assert info.value.code == "privacy-ledger-unwritable"
            assert "disk full" in info.value.local_detail and str(tmp_path) not in str(info.value)
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "privacy-ledger.json", "privacy-ledger.json.lock"]
    assert len(PrivacyLedger(path).entries()) == 1


def test_an_unwritable_ledger_stops_the_release(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("x")
    site = _Site(tmp_path, ledger=tmp_path / "not-a-folder" / "ledger.json")
    with pytest.raises(FedradError) as info:
        _round(site, 1, 1)
    assert info.value.code == "privacy-ledger-unwritable"
    assert "privacy-ledger=" in str(info.value) and str(tmp_path) not in str(info.value)


def test_concurrent_runs_at_one_site_are_serialised(tmp_path: Path) -> None:
    site = _Site(tmp_path)
    errors: list[BaseException] = []

    def run(run_id: int) -> None:
        try:
            for rnd in range(1, 5):
                _round(site, run_id, rnd)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entries = PrivacyLedger(tmp_path / "privacy-ledger.json").entries()
    assert len(entries) == 8
    assert max(e.epsilon_total for e in entries) == pytest.approx(
        gaussian_epsilon([2.0] * 8, 1e-5))


def test_ledger_text_and_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedrad.cli import app

    site = _Site(tmp_path)
    _round(site, 7, 1)
    _round(site, 7, 2)
    _round(site, 9, 1)
    text = ledger_text(tmp_path / "privacy-ledger.json", budget=20.0)
    total = gaussian_epsilon([2.0] * 3, 1e-5)
    assert f"run 7: 2 rounds, epsilon {gaussian_epsilon([2.0] * 2, 1e-5):.4g}" in text
    assert f"total: epsilon {total:.4g} (delta 1e-05) over 2 runs" in text
    assert f"left: {20.0 - total:.4g}" in text
    result = CliRunner().invoke(app, ["site", "privacy", str(tmp_path / "privacy-ledger.json")])
    assert result.exit_code == 0, result.output
    assert f"total: epsilon {total:.4g}" in result.output
    result = CliRunner().invoke(app, ["site", "privacy", str(tmp_path), "--budget", "20"])
    assert result.exit_code == 0 and f"left: {20.0 - total:.4g}" in result.output
    (tmp_path / "broken.json").write_text("{")
    result = CliRunner().invoke(app, ["site", "privacy", str(tmp_path / "broken.json")])
    assert result.exit_code == 2 and "privacy-ledger-corrupt" in result.output
    assert "no differentially private round" in ledger_text(tmp_path / "none.json")
    assert os.path.exists(tmp_path / "privacy-ledger.json")


# --------------------------------------------------------------------------- the ClientApp


def _write_site(path: Path, n: int = 40, size: int = 32) -> Path:
    from fedrad.common.cache import write_cache

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 120, (n, size, size)).astype(np.uint8)
    images[labels == 1, 8:24, 8:24] += 100
    write_cache(path, images, labels, records=[{"id": f"i{i}", "label": int(v)}
                                               for i, v in enumerate(labels)],
                quarantine=[], meta={"num_classes": 2})
    return path


def _train_reply(app, arrays, settings, node_config, server_round=1):
    import time

    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id="1", created_at=time.time(),
                        ttl=600.0, message_type="train")
    config = {**settings.to_site_config(), "server-round": server_round}
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
                  metadata=metadata)
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                  run_config={})
    return app(msg, ctx)


def test_client_app_train_with_dp_clips_noises_and_records(tmp_path: Path) -> None:
    from flwr.app import ArrayRecord

    from fedrad.client.client_app import make_client_app
    from fedrad.common.models import model_from_settings

    cache = _write_site(tmp_path / "Doe_Jane" / "cache")
    plain = load_settings({"image-size": 32, "batch-size": 16, "learning-rate": 0.05,
                           "secure-aggregation": False})
    sigma, clip = 0.05, 0.05
    dp = plain.replace(dp_noise_multiplier=sigma, dp_clip=clip)
    torch.manual_seed(0)
    received = model_from_settings(plain).state_dict()
    arrays = ArrayRecord(received)
    app = make_client_app()
    node = {"data-dir": str(cache), "site-id": "site-a", "privacy-budget": 450.0}

    reply0 = _train_reply(app, arrays, plain, {"data-dir": str(cache), "site-id": "site-a"})
    assert not reply0.has_error()
    assert not (cache / "privacy-ledger.json").exists()
    reply1 = _train_reply(app, arrays, dp, node)
    assert not reply1.has_error()
    trained = reply0.content["arrays"].to_torch_state_dict()
    released = reply1.content["arrays"].to_torch_state_dict()

    floats = [k for k, v in received.items() if v.is_floating_point()]
    u0 = torch.cat([(trained[k].double() - received[k].double()).flatten() for k in floats])
    u1 = torch.cat([(released[k].double() - received[k].double()).flatten() for k in floats])
    assert float(u0.norm()) > 5 * clip  # the plain update would be clipped
    direction = u0 / u0.norm()
    # along the plain update: the clipped length, plus one coordinate of noise
    assert float(u1 @ direction) == pytest.approx(clip, abs=5 * sigma * clip)
    residual = u1 - (u1 @ direction) * direction
    assert float(residual.std()) == pytest.approx(sigma * clip, rel=0.02)
    for k, v in received.items():
        if not v.is_floating_point():
            assert torch.equal(released[k], trained[k]) and released[k].dtype == v.dtype

    metrics = dict(reply1.content["metrics"])
    assert metrics["dp-epsilon-round"] == pytest.approx(gaussian_epsilon([sigma], 1e-5))
    assert "450" not in repr(metrics)  # the budget stays at the site
    entries = PrivacyLedger(cache / "privacy-ledger.json").entries()
    assert [(e.run_id, e.server_round, e.noise_multiplier, e.clip) for e in entries] == [
        ("1", 1, sigma, clip)]

    # a second round would take the total over the site's budget: refused, not recorded
    with pytest.raises(Exception) as info:
        _train_reply(app, arrays, dp, node, server_round=2)
    text = str(info.value)
    assert "privacy-budget-exceeded" in text and "450" in text
    assert "Doe_Jane" not in text and str(tmp_path) not in text
    assert len(PrivacyLedger(cache / "privacy-ledger.json").entries()) == 1
