"""fedrad's secure aggregation core: encoding, Shamir sharing, masks and the protocol."""

from __future__ import annotations

import numpy as np
import pytest

from fedrad.common.errors import FedradError
from fedrad.common.secagg import (
    SecAggClient,
    SecAggParams,
    SecAggServer,
    check_headroom,
    decode,
    encode,
    expand_mask,
    flatten_arrays,
    max_scale_bits,
    neighbours,
    shamir,
    sum_error_bound,
    unflatten_arrays,
)
from fedrad.common.secagg.masks import mask_word, self_mask_seed

LENGTH = 4099  # not a multiple of the chunk size
# chi-square critical values with 255 degrees of freedom (scipy.stats.chi2.isf(p, 255))
CHI2_255_P1E6 = 377.08  # fresh random keys every run: a 1e-4 bound failed about 1 in 10**4
CHI2_255_P1E10 = 425.92


def _chi2_uniform_bytes(values: np.ndarray) -> float:
    hist = np.bincount(values.view(np.uint8), minlength=256).astype(np.float64)
    expected = hist.sum() / 256
    return float(((hist - expected) ** 2 / expected).sum())


class Round:
    """Drives one round through every stage for a set of in-process clients."""

    def __init__(self, n: int, params: SecAggParams, length: int = LENGTH) -> None:
        self.params = params
        self.ids = [1000 + 7 * i for i in range(n)]
        self.clients = {u: SecAggClient(u, params) for u in self.ids}
        self.server = SecAggServer(params, vector_length=length)
        self.length = length

    def setup(self) -> None:
        adverts = {u: c.advertise_keys() for u, c in self.clients.items()}
        broadcast = self.server.collect_keys(adverts)
        outgoing = {u: c.share_keys(broadcast) for u, c in self.clients.items()}
        inbox = self.server.route_shares(outgoing)
        for u, c in self.clients.items():
            c.receive_shares(inbox[u])

    def masked(self, vectors: dict, weights: dict | None) -> dict[int, np.ndarray]:
        if weights is None:
            return {u: c.masked_input(vectors[u]) for u, c in self.clients.items()}
        total = float(sum(weights.values()))
        return {
            u: c.masked_input(vectors[u], weights[u], total_weight=total)
            for u, c in self.clients.items()
        }

    def finish(self, masked: dict[int, np.ndarray], dropped: set[int]):
        for u, m in masked.items():
            if u not in dropped:
                self.server.add_masked_input(u, m)
        survivors, gone = self.server.unmask_request()
        for u in survivors:
            self.server.add_unmask_shares(u, self.clients[u].unmask_shares(survivors, gone))
        return self.server.unmask()


def _data(ids: list[int], seed: int, length: int = LENGTH) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    vectors = {u: rng.normal(0, 0.5, length).astype(np.float32) for u in ids}
    weights = {u: float(rng.integers(1, 5000)) for u in ids}
    return vectors, weights


def _fedavg(vectors: dict, weights: dict, members) -> np.ndarray:
    total = sum(weights[u] for u in members)
    return sum(weights[u] * vectors[u].astype(np.float64) for u in members) / total


# --- encoding -------------------------------------------------------------------------


def test_encode_decode_sum_within_bound() -> None:
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-3, 3, 10_000).astype(np.float32) for _ in range(7)]
    total = np.zeros(10_000, np.uint32)
    for x in xs:
        total += encode(x, clip=4.0, scale_bits=20)
    got = decode(total, n_clients=7, clip=4.0, scale_bits=20)
    err = np.abs(got - np.sum(np.asarray(xs, np.float64), axis=0)).max()
    assert err <= sum_error_bound(7, scale_bits=20)
    assert err > 0  # the quantisation is real, so the bound is what is being checked


def test_encode_clips_and_negative_values_wrap() -> None:
    x = np.array([-10.0, -1.0, 0.0, 1.0, 10.0], np.float32)
    enc = encode(x, clip=2.0, scale_bits=4)
    assert enc.dtype == np.uint32
    assert enc[0] == 2**32 - 32  # -2 * 16 in two's complement
    np.testing.assert_array_equal(
        decode(enc, n_clients=1, clip=2.0, scale_bits=4), [-2, -1, 0, 1, 2]
    )


def test_headroom_rule() -> None:
    bits = max_scale_bits(10, clip=8.0, weighted=False)
    check_headroom(10, clip=8.0, scale_bits=bits, weighted=False)
    with pytest.raises(FedradError) as err:
        check_headroom(10, clip=8.0, scale_bits=bits + 1, weighted=False)
    assert err.value.code == "no-headroom"
    # weighted sums need headroom for one clip only
    assert max_scale_bits(10, clip=8.0, weighted=True) == 27


def test_encode_rejects_nan() -> None:
    x = np.zeros(10, np.float32)
    x[3] = np.nan
    with pytest.raises(FedradError) as err:
        encode(x, clip=1.0, scale_bits=8)
    assert err.value.code == "non-finite"


def test_flatten_unflatten_restores_shapes_and_dtypes() -> None:
    state = {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
        "bn.num_batches_tracked": np.array(17, dtype=np.int64),
        "fc.bias": np.array([0.5, -0.25], dtype=np.float16),
    }
    flat, spec = flatten_arrays(state)
    assert flat.shape == (27,) and flat.dtype == np.float32
    back = unflatten_arrays(flat + np.float32(1e-3), spec)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
    assert back["bn.num_batches_tracked"] == 17
    np.testing.assert_allclose(back["conv.weight"], state["conv.weight"] + 1e-3, rtol=1e-6)
    with pytest.raises(FedradError) as err:
        unflatten_arrays(flat[:-1], spec)
    assert err.value.code == "bad-length"


# --- Shamir ---------------------------------------------------------------------------


def test_shamir_round_trip_and_threshold() -> None:
    secret = bytes(range(32))
    shares = shamir.share_secret(secret, [3, 9, 11, 20, 21], 3)
    assert shamir.combine({x: shares[x] for x in (9, 20, 21)}, 3) == secret
    assert shamir.combine(shares, 3) == secret
    with pytest.raises(FedradError) as err:
        shamir.combine({x: shares[x] for x in (3, 9)}, 3)
    assert err.value.code == "too-few-shares"
    # two shares interpolated as if the threshold were 2 give a random field element,
    # not the secret (and almost surely not even a 32-byte value)
    with pytest.raises(FedradError) as err:
        shamir.combine({x: shares[x] for x in (3, 9)}, 2)
    assert err.value.code == "bad-share"
    y = shamir.share_from_bytes(shamir.share_to_bytes(shares[3]))
    assert y == shares[3]
    with pytest.raises(FedradError):
        shamir.share_from_bytes(b"\x00" * 10)


# --- the protocol ---------------------------------------------------------------------


@pytest.mark.parametrize(("n", "t"), [(3, 2), (5, 3)])
def test_weighted_mean_matches_fedavg(n: int, t: int) -> None:
    rnd = Round(n, SecAggParams(threshold=t, round_id=1))
    vectors, weights = _data(rnd.ids, seed=n)
    rnd.setup()
    result = rnd.finish(rnd.masked(vectors, weights), dropped=set())
    expected = _fedavg(vectors, weights, rnd.ids)
    assert result.values.shape == (LENGTH,)
    assert np.abs(result.values - expected).max() <= result.error_bound
    assert result.values.dtype == np.float32
    assert result.error_bound < 2e-6
    assert result.weight_sum == pytest.approx(1.0, abs=1e-6)
    assert result.dropped == ()


def test_unweighted_integer_sum_is_exact() -> None:
    params = SecAggParams(threshold=3, weighted=False, clip=1e6, scale_bits=0)
    rnd = Round(4, params, length=50)
    rng = np.random.default_rng(4)
    counts = {u: rng.integers(0, 1000, 50).astype(np.float64) for u in rnd.ids}
    rnd.setup()
    result = rnd.finish(rnd.masked(counts, None), dropped=set())
    np.testing.assert_array_equal(result.values, sum(counts.values()))


@pytest.mark.parametrize("n_dropped", [1, 2])
def test_dropouts_after_masking_are_recovered(n_dropped: int) -> None:
    rnd = Round(5, SecAggParams(threshold=3, round_id=2))
    vectors, weights = _data(rnd.ids, seed=10 + n_dropped)
    rnd.setup()
    dropped = set(rnd.ids[1 : 1 + n_dropped])
    result = rnd.finish(rnd.masked(vectors, weights), dropped=dropped)
    survivors = [u for u in rnd.ids if u not in dropped]
    assert result.dropped == tuple(sorted(dropped))
    expected = _fedavg(vectors, weights, survivors)
    assert np.abs(result.values - expected).max() <= result.error_bound


def test_secagg_plus_neighbour_graph_with_dropouts() -> None:
    params = SecAggParams(threshold=3, degree=4, round_id=5)
    rnd = Round(8, params)
    assert len(neighbours(rnd.ids[0], rnd.ids, 4)) == 4
    vectors, weights = _data(rnd.ids, seed=8)
    rnd.setup()
    dropped = {rnd.ids[0], rnd.ids[4]}
    result = rnd.finish(rnd.masked(vectors, weights), dropped=dropped)
    expected = _fedavg(vectors, weights, [u for u in rnd.ids if u not in dropped])
    assert np.abs(result.values - expected).max() <= result.error_bound


def test_too_many_dropouts_fail_cleanly_and_next_round_proceeds() -> None:
    rnd = Round(5, SecAggParams(threshold=3, round_id=6))
    vectors, weights = _data(rnd.ids, seed=6)
    rnd.setup()
    masked = rnd.masked(vectors, weights)
    for u in rnd.ids[:2]:
        rnd.server.add_masked_input(u, masked[u])
    with pytest.raises(FedradError) as err:
        rnd.server.unmask_request()
    assert err.value.code == "too-many-dropouts"
    with pytest.raises(FedradError) as err:  # nothing more can be asked of a failed round
        rnd.server.unmask()
    assert err.value.code == "bad-stage"
    nxt = Round(5, SecAggParams(threshold=3, round_id=7))
    nxt.setup()
    result = nxt.finish(nxt.masked(vectors, weights), dropped={nxt.ids[0]})
    expected = _fedavg(vectors, weights, nxt.ids[1:])
    assert np.abs(result.values - expected).max() <= result.error_bound


def test_missing_unmask_shares_fail_without_partial_sum() -> None:
    rnd = Round(5, SecAggParams(threshold=4, round_id=8))
    vectors, weights = _data(rnd.ids, seed=9)
    rnd.setup()
    masked = rnd.masked(vectors, weights)
    for u in rnd.ids[:4]:
        rnd.server.add_masked_input(u, masked[u])
    survivors, gone = rnd.server.unmask_request()
    for u in survivors[:3]:  # one survivor vanishes before sending its shares
        rnd.server.add_unmask_shares(u, rnd.clients[u].unmask_shares(survivors, gone))
    with pytest.raises(FedradError) as err:
        rnd.server.unmask()
    assert err.value.code == "too-many-dropouts"
    assert rnd.server._acc is None  # the masked sum was discarded


def test_masked_input_looks_uniform_and_uncorrelated() -> None:
    length = 60_000
    rnd = Round(3, SecAggParams(threshold=2, round_id=9), length=length)
    ramp = np.linspace(-1, 1, length, dtype=np.float32)
    vectors = {u: ramp for u in rnd.ids}
    rnd.setup()
    masked = rnd.masked(vectors, {u: 1.0 for u in rnd.ids})
    m = masked[rnd.ids[0]]
    assert _chi2_uniform_bytes(m) < CHI2_255_P1E6
    assert abs(np.corrcoef(m[:-1].astype(np.float64), ramp)[0, 1]) < 0.03
    plain = encode(ramp, clip=8.0, scale_bits=27, factor=1 / 3)
    assert _chi2_uniform_bytes(plain) > CHI2_255_P1E10  # the test can tell structure apart
    assert np.mean(m[:-1] == plain) < 1e-3


def test_masks_differ_across_rounds_clients_and_seeds() -> None:
    seed = bytes(32)
    assert not np.array_equal(
        expand_mask(self_mask_seed(seed, 1, 5), 1000), expand_mask(self_mask_seed(seed, 2, 5), 1000)
    )
    assert not np.array_equal(
        expand_mask(self_mask_seed(seed, 1, 5), 1000), expand_mask(self_mask_seed(seed, 1, 6), 1000)
    )
    full = expand_mask(seed, 1000)
    assert [mask_word(seed, i) for i in (0, 3, 4, 998, 999)] == [
        int(full[i]) for i in (0, 3, 4, 998, 999)
    ]
    vec = np.zeros(1000, np.float32)
    outs = []
    for round_id in (1, 2):
        rnd = Round(3, SecAggParams(threshold=2, round_id=round_id), length=1000)
        rnd.setup()
        outs.append(rnd.masked({u: vec for u in rnd.ids}, {u: 1.0 for u in rnd.ids}))
    first, second = outs
    a, b = first[rnd.ids[0]], first[rnd.ids[1]]
    assert np.mean(a == b) < 0.01
    assert np.mean(first[rnd.ids[0]] == second[rnd.ids[0]]) < 0.01


def test_tampered_and_wrong_length_shares_are_refused() -> None:
    rnd = Round(3, SecAggParams(threshold=2))
    adverts = {u: c.advertise_keys() for u, c in rnd.clients.items()}
    broadcast = rnd.server.collect_keys(adverts)
    outgoing = {u: c.share_keys(broadcast) for u, c in rnd.clients.items()}
    inbox = rnd.server.route_shares(outgoing)
    a, b = rnd.ids[0], rnd.ids[1]
    tampered = dict(inbox[a])
    ct = bytearray(tampered[b])
    ct[-1] ^= 1
    tampered[b] = bytes(ct)
    with pytest.raises(FedradError) as err:
        rnd.clients[a].receive_shares(tampered)
    assert err.value.code == "bad-share" and "authentication" in err.value.message
    short = dict(inbox[a])
    short[b] = short[b][:-5]
    with pytest.raises(FedradError) as err:
        rnd.clients[a].receive_shares(short)
    assert err.value.code == "bad-share"
    swapped = {b: inbox[rnd.ids[2]][b]}  # a share meant for another node
    with pytest.raises(FedradError) as err:
        rnd.clients[a].receive_shares(swapped)
    assert err.value.code == "bad-share"


def test_bad_inputs_are_refused_and_count_as_dropped() -> None:
    rnd = Round(4, SecAggParams(threshold=3, round_id=11))
    vectors, weights = _data(rnd.ids, seed=11)
    rnd.setup()
    masked = rnd.masked(vectors, weights)
    bad = rnd.ids[2]
    cases = [
        (masked[bad][:-1], "bad-length"),
        (masked[bad].astype(np.int64), "bad-input"),
        (masked[bad].reshape(1, -1), "bad-input"),
    ]
    for arr, code in cases:
        with pytest.raises(FedradError) as err:
            rnd.server.add_masked_input(bad, arr)
        assert err.value.code == code
    rnd.server.add_masked_input(rnd.ids[0], masked[rnd.ids[0]])
    with pytest.raises(FedradError) as err:  # a replay
        rnd.server.add_masked_input(rnd.ids[0], masked[rnd.ids[0]])
    assert err.value.code == "duplicate-input"
    with pytest.raises(FedradError) as err:
        rnd.server.add_masked_input(99, masked[rnd.ids[0]])
    assert err.value.code == "bad-peer"
    result = rnd.finish({u: masked[u] for u in rnd.ids if u != rnd.ids[0]}, dropped={bad})
    expected = _fedavg(vectors, weights, [u for u in rnd.ids if u != bad])
    assert result.dropped == (bad,)
    assert np.abs(result.values - expected).max() <= result.error_bound


def test_client_input_validation() -> None:
    rnd = Round(3, SecAggParams(threshold=2))
    client = rnd.clients[rnd.ids[0]]
    with pytest.raises(FedradError) as err:
        client.masked_input(np.zeros(5, np.float32), 1.0, total_weight=2.0)
    assert err.value.code == "bad-stage"
    rnd.setup()
    nan = np.zeros(LENGTH, np.float32)
    nan[7] = np.inf
    with pytest.raises(FedradError) as err:
        client.masked_input(nan, 1.0, total_weight=2.0)
    assert err.value.code == "non-finite"
    with pytest.raises(FedradError) as err:
        client.masked_input(np.zeros(LENGTH, np.float32), 3.0, total_weight=2.0)
    assert err.value.code == "bad-weight"
    with pytest.raises(FedradError) as err:
        client.masked_input(np.zeros((2, 3), np.float32), 1.0, total_weight=2.0)
    assert err.value.code == "bad-input"


def test_client_never_reveals_both_secrets_of_a_peer() -> None:
    rnd = Round(4, SecAggParams(threshold=2, round_id=12))
    vectors, weights = _data(rnd.ids, seed=12)
    rnd.setup()
    rnd.masked(vectors, weights)
    me, peer = rnd.clients[rnd.ids[0]], rnd.ids[1]
    with pytest.raises(FedradError) as err:
        me.unmask_shares(rnd.ids, [peer])
    assert err.value.code == "double-reveal"
    first = me.unmask_shares([rnd.ids[0], peer, rnd.ids[2]], [rnd.ids[3]])
    assert peer in first["b"] and rnd.ids[3] in first["sk"]
    assert rnd.ids[0] not in first["sk"]
    with pytest.raises(FedradError) as err:  # a second request calling peer dropped
        me.unmask_shares([rnd.ids[0], rnd.ids[2]], [peer])
    assert err.value.code == "double-reveal"
    with pytest.raises(FedradError) as err:
        me.unmask_shares([rnd.ids[0]], [])  # below threshold
    assert err.value.code == "too-many-dropouts"


def test_error_texts_carry_no_values() -> None:
    rnd = Round(3, SecAggParams(threshold=3, round_id=13), length=10)
    vectors = {u: np.full(10, 0.123456, np.float32) for u in rnd.ids}
    rnd.setup()
    masked = rnd.masked(vectors, {u: 1.0 for u in rnd.ids})
    rnd.server.add_masked_input(rnd.ids[0], masked[rnd.ids[0]])
    with pytest.raises(FedradError) as err:
        rnd.server.unmask_request()
    assert "0.123" not in str(err.value) and str(masked[rnd.ids[0]][0]) not in str(err.value)


def test_one_sided_share_exchange_is_not_delivered() -> None:
    rnd = Round(4, SecAggParams(threshold=2, round_id=14))
    vectors, weights = _data(rnd.ids, seed=14)
    adverts = {u: c.advertise_keys() for u, c in rnd.clients.items()}
    broadcast = rnd.server.collect_keys(adverts)
    outgoing = {u: c.share_keys(broadcast) for u, c in rnd.clients.items()}
    a, b = rnd.ids[0], rnd.ids[1]
    del outgoing[a][b]  # a never sends its share to b
    inbox = rnd.server.route_shares(outgoing)
    assert a not in inbox[b] and b not in inbox[a]  # so neither masks with the other
    for u, c in rnd.clients.items():
        c.receive_shares(inbox[u])
    result = rnd.finish(rnd.masked(vectors, weights), dropped={rnd.ids[2]})
    expected = _fedavg(vectors, weights, [u for u in rnd.ids if u != rnd.ids[2]])
    assert np.abs(result.values - expected).max() <= result.error_bound


def test_understated_total_weight_is_detected() -> None:
    rnd = Round(3, SecAggParams(threshold=2, round_id=15))
    vectors, _ = _data(rnd.ids, seed=15)
    rnd.setup()
    # each weight passes the client's check, but together they exceed total_weight
    masked = {u: c.masked_input(vectors[u], 2.0, total_weight=3.0) for u, c in rnd.clients.items()}
    with pytest.raises(FedradError) as err:
        rnd.finish(masked, dropped=set())
    assert err.value.code == "bad-weight"


def test_client_refuses_a_key_list_with_repeated_keys() -> None:
    rnd = Round(3, SecAggParams(threshold=2))
    adverts = {u: c.advertise_keys() for u, c in rnd.clients.items()}
    a, b = rnd.ids[0], rnd.ids[1]
    forged = {u: dict(v) for u, v in adverts.items()}
    forged[b]["s_pk"] = forged[a]["s_pk"]  # a server reflecting a's key back as b's
    with pytest.raises(FedradError) as err:
        rnd.clients[a].share_keys(forged)
    assert err.value.code == "bad-key"
    with pytest.raises(FedradError) as err:
        rnd.server.collect_keys(forged)
    assert err.value.code == "bad-key"


def test_client_state_survives_a_process_boundary_at_every_stage() -> None:
    """Each stage may run in a fresh process: export, JSON, rebuild, continue."""
    import json

    from fedrad.common.secagg import SecAggServer

    params = SecAggParams(threshold=2, round_id=4)
    ids = [1, 2, 3]

    def hop(client: SecAggClient) -> SecAggClient:
        return SecAggClient.from_state(json.loads(json.dumps(client.export_state())))

    # advertise before the cohort is known, with a placeholder id; bind() fixes it later
    clients = {u: SecAggClient(1, SecAggParams(threshold=2, round_id=4)) for u in ids}
    adverts = {u: c.advertise_keys() for u, c in clients.items()}
    clients = {u: hop(c) for u, c in clients.items()}
    for u, c in clients.items():
        c.bind(u, params)
    server = SecAggServer(params, vector_length=5)
    keys = server.collect_keys(adverts)
    inbox = server.route_shares({u: c.share_keys(keys) for u, c in clients.items()})
    clients = {u: hop(c) for u, c in clients.items()}
    for u, c in clients.items():
        c.receive_shares(inbox[u])
    clients = {u: hop(c) for u, c in clients.items()}
    vectors = {u: np.full(5, float(u)) for u in ids}
    for u in ids[:2]:  # node 3 drops after sharing keys
        server.add_masked_input(u, clients[u].masked_input(vectors[u], u, total_weight=10))
    clients = {u: hop(c) for u, c in clients.items()}
    survivors, dropped = server.unmask_request()
    assert dropped == [3]
    for u in survivors:
        server.add_unmask_shares(u, clients[u].unmask_shares(survivors, dropped))
    result = server.unmask()
    np.testing.assert_allclose(result.values, (1 * 1 + 2 * 2) / 3, atol=result.error_bound)
    # the reveal record persists too: asking again with roles swapped is refused
    again = hop(clients[1])
    with pytest.raises(FedradError, match="double-reveal"):
        again.unmask_shares([1, 3], [2])


def test_unreadable_client_state_is_a_clear_error() -> None:
    with pytest.raises(FedradError, match="bad-state"):
        SecAggClient.from_state({"node_id": 1})


def test_bind_only_between_advertise_and_share() -> None:
    client = SecAggClient(1, SecAggParams(threshold=2))
    with pytest.raises(FedradError, match="bad-stage"):
        client.bind(2, SecAggParams(threshold=2))


def test_update_and_counts_vectors_round_trip() -> None:
    from fedrad.common.metrics import count_outcomes, counts_to_metrics
    from fedrad.common.secagg.wire import (
        counts_to_vector,
        update_to_vector,
        vector_to_counts,
        vector_to_update,
    )

    ref = {"w": np.ones((2, 3), np.float32), "n": np.array(7, np.int64)}
    local = {"w": np.full((2, 3), 1.5, np.float32), "n": np.array(19, np.int64)}
    vec = update_to_vector(local, ref, loss=0.25)
    assert vec.shape == (8,) and vec[-1] == 0.25 and abs(vec[6]) <= 1  # ints scaled down
    new, loss = vector_to_update(vec, ref)
    np.testing.assert_array_equal(new["w"], local["w"])
    assert new["n"].dtype == np.int64 and int(new["n"]) == 19 and loss == 0.25
    bad = dict(local, w=np.full((2, 3), np.inf, np.float32))
    with pytest.raises(FedradError, match="non-finite"):
        update_to_vector(bad, ref, loss=0.1)
    with pytest.raises(FedradError, match="wrong-shape"):
        update_to_vector({"w": local["w"]}, ref, loss=0.1)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 30)
    counts = count_outcomes(np.stack([1 - labels * 0.7, labels * 0.7], 1), labels, bins=10)
    metrics = {"num-examples": 30, **counts_to_metrics(counts)}
    summed = 2 * counts_to_vector(metrics, num_classes=2, bins=10, train_examples=120)
    back = vector_to_counts(summed, num_classes=2, bins=10)
    assert back["num-examples"] == 60 and back["train-examples"] == 240
    assert back["confusion"] == [2 * v for v in metrics["confusion"]]


@pytest.mark.parametrize("workers", [2, 3, 6])
def test_masks_applied_by_several_threads_are_the_same_masks(workers, monkeypatch) -> None:
    """Threads each take a range of chunks and enter the AES-CTR streams at its first
    block: the sum, and what fill and post see, must not depend on how many there are."""
    import threading

    import fedrad.common.secagg.masks as masks
    from fedrad.common.secagg.encoding import CHUNK_ELEMENTS
    from fedrad.common.secagg.masks import apply_masks

    monkeypatch.setattr(masks, "_MIN_CHUNKS_PER_WORKER", 1)  # threads for a small vector
    n = 5 * CHUNK_ELEMENTS + 7  # the last chunk is partial
    rng = np.random.default_rng(4)
    seeds = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(5)]
    content = rng.integers(0, 2**32, n, dtype=np.uint32)

    def run(w: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]], set[str]]:
        acc = np.empty(n, np.uint32)
        seen, threads, decoded = [], set(), np.empty(n, np.uint32)

        def fill(start: int, stop: int, chunk: np.ndarray) -> None:
            chunk[:] = content[start:stop]

        def post(start: int, stop: int, chunk: np.ndarray) -> None:
            seen.append((start, stop))
            threads.add(threading.current_thread().name)
            decoded[start:stop] = chunk

        apply_masks(acc, add=seeds[:3], subtract=seeds[3:], fill=fill, post=post, workers=w)
        return acc, decoded, sorted(seen), threads

    one, one_post, one_seen, _ = run(1)
    many, many_post, many_seen, names = run(workers)
    np.testing.assert_array_equal(many, one)
    np.testing.assert_array_equal(many_post, one)  # post saw each chunk masked, once
    assert many_seen == one_seen and len(one_seen) == 6  # every chunk, once
    assert names and all(t.startswith("secagg-masks") for t in names)  # in the pool
    expected = content.copy()
    for s in seeds[:3]:
        expected += expand_mask(s, n)
    for s in seeds[3:]:
        expected -= expand_mask(s, n)
    np.testing.assert_array_equal(one, expected)

    def broken(start: int, stop: int, chunk: np.ndarray) -> None:
        if start >= 3 * CHUNK_ELEMENTS:
            raise FedradError("bad-input", "this chunk cannot be decoded")

    with pytest.raises(FedradError, match="cannot be decoded"):
        apply_masks(np.zeros(n, np.uint32), add=seeds, subtract=[], post=broken,
                    workers=workers)
