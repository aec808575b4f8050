"""Secure aggregation cost: fedrad's SecAgg+ core against plain FedAvg on the same vectors.

For each model size and number of simulated sites, one full round runs in this process:
every client advertises keys, shares them (X25519, Shamir, ChaCha20-Poly1305), masks its
flat float32 update (fixed-point encoding + self mask + one AES-256-CTR mask per peer), the
server sums the masked vectors as they arrive, collects the unmasking shares and removes the
masks.  The same vectors are averaged by a plain numpy FedAvg (streaming weighted mean), and
the unmasked result is checked against it within the documented quantisation bound.

Columns (CPU seconds of this process, one round; ``(wall)`` columns are wall-clock seconds,
which on a shared machine include time spent waiting for the CPU):

* ``setup``   per-client key agreement and share encryption/decryption (median)
* ``mask``    per-client encoding + masking of the whole vector (median over the sites)
* ``sum``     server: adding the masked vectors as they arrive (all sites)
* ``unmask``  server: Shamir reconstruction, removing the self masks, decoding
* ``fedavg``  plain FedAvg of the same float vectors (all sites)
* ratios      ``mask / fedavg`` and ``(sum + unmask) / fedavg``

Targets (issue 4): ``mask <= 0.25 s`` and ``unmask <= 0.15 s`` for ResNet-18 at n = 10 on
ONE core.  numpy element-wise ops and OpenSSL are single-threaded here; the script also pins
itself to one CPU (``--no-pin`` to disable; ``taskset -c 0 python ...`` does the same from
the shell).  Flower's SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``) is not compared
yet.

Usage (fedrad must be importable)::

    python benchmarks/secure_aggregation.py                    # both sizes, n = 5 10 20
    python benchmarks/secure_aggregation.py --quick            # ResNet-18, n = 5 10
    python benchmarks/secure_aggregation.py --sizes resnet18 --sites 10 --dropouts 2
    python benchmarks/secure_aggregation.py --sites 20 --degree 8      # SecAgg+ graph
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from fedrad.common.secagg import SecAggClient, SecAggParams, SecAggServer  # noqa: E402

SIZES = {"resnet18": 11_689_512, "resnet50": 25_557_032}


class Clock:
    """Accumulates CPU seconds (this process) and wall seconds of the timed blocks."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def __enter__(self) -> Clock:
        self._c, self._w = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu += time.process_time() - self._c
        self.wall += time.perf_counter() - self._w


def fedavg(base: np.ndarray, scales: list[float], shares: list[float]) -> tuple[Clock, np.ndarray]:
    """Plain streaming FedAvg of the sites' vectors; returns (clock, mean)."""
    acc = np.zeros_like(base)
    vec = np.empty_like(base)
    tmp = np.empty_like(base)
    clock = Clock()
    for scale, share in zip(scales, shares, strict=True):
        site_vector(base, scale, out=vec)  # the site's update arrives (not timed)
        with clock:
            np.multiply(vec, np.float32(share), out=tmp)
            np.add(acc, tmp, out=acc)
    return clock, acc


def site_vector(base: np.ndarray, scale: float, *, out: np.ndarray) -> np.ndarray:
    """Site i's update: a scaled copy of one random vector (cheap, distinct per site)."""
    np.multiply(base, np.float32(scale), out=out)
    out += np.float32(0.01 * scale)
    return out


def one_round(
    length: int, n: int, threshold: int, dropouts: int, seed: int, degree: int | None = None
) -> dict:
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 0.05, length).astype(np.float32)
    scales = [1.0 + 0.1 * i for i in range(n)]
    weights = [float(w) for w in rng.integers(100, 5000, n)]
    total = sum(weights)
    params = SecAggParams(threshold=threshold, round_id=seed, degree=degree)
    ids = list(range(1, n + 1))
    clients = {u: SecAggClient(u, params) for u in ids}
    server = SecAggServer(params, vector_length=length)

    setup = {u: Clock() for u in ids}
    adverts = {}
    for u, c in clients.items():
        with setup[u]:
            adverts[u] = c.advertise_keys()
    broadcast = server.collect_keys(adverts)
    outgoing = {}
    for u, c in clients.items():
        with setup[u]:
            outgoing[u] = c.share_keys(broadcast)
    inbox = server.route_shares(outgoing)
    for u, c in clients.items():
        with setup[u]:
            c.receive_shares(inbox[u])

    dropped = set(ids[:dropouts])
    vec = np.empty_like(base)
    mask_clocks: list[Clock] = []
    sum_clock = Clock()
    for i, (u, c) in enumerate(clients.items()):
        site_vector(base, scales[i], out=vec)
        clock = Clock()
        with clock:
            masked = c.masked_input(vec, weights[i], total_weight=total)
        mask_clocks.append(clock)
        if u in dropped:
            continue
        with sum_clock:
            server.add_masked_input(u, masked)
        del masked

    unmask_clock = Clock()
    with unmask_clock:
        survivors, gone = server.unmask_request()
    replies = {u: clients[u].unmask_shares(survivors, gone) for u in survivors}
    with unmask_clock:
        for u, r in replies.items():
            server.add_unmask_shares(u, r)
        result = server.unmask()

    alive = [i for i, u in enumerate(ids) if u not in dropped]
    alive_total = sum(weights[i] for i in alive)
    fedavg_clock, mean = fedavg(
        base, [scales[i] for i in alive], [weights[i] / alive_total for i in alive]
    )
    err = float(np.abs(result.values.astype(np.float64) - mean).max())
    return {
        "setup": statistics.median(c.cpu for c in setup.values()),
        "mask": statistics.median(c.cpu for c in mask_clocks),
        "mask_wall": statistics.median(c.wall for c in mask_clocks),
        "sum": sum_clock.cpu,
        "unmask": unmask_clock.cpu,
        "unmask_wall": unmask_clock.wall,
        "fedavg": fedavg_clock.cpu,
        "err": err,
        # the reference is float32, so allow its own rounding next to the quantisation bound
        "bound": result.error_bound + 1e-6 * float(np.abs(mean).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help=f"{list(SIZES)} or ints")
    parser.add_argument("--sites", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--quick", action="store_true", help="ResNet-18 only, n = 5 and 10")
    parser.add_argument("--dropouts", type=int, default=0, help="sites dropping after masking")
    parser.add_argument("--threshold", type=float, default=0.5, help="t = int(fraction * n) + 1")
    parser.add_argument(
        "--degree", type=int, default=None, help="SecAgg+ neighbours per site (even; default all)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    args = parser.parse_args(argv)
    sizes, sites = args.sizes, args.sites
    if args.quick:
        sizes, sites = ["resnet18"], [s for s in sites if s <= 10] or [5, 10]
    pinned = "no"
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        pinned = f"cpu {cpu}"
    print(
        f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"numpy {np.__version__}, pinned: {pinned}, dropouts: {args.dropouts}, "
        f"degree: {args.degree or 'all'}"
    )
    header = (
        f"{'model':<9}{'params':>11}{'n':>4}{'t':>4}{'setup':>7}{'mask':>7}{'(wall)':>7}"
        f"{'sum':>7}{'unmask':>7}{'(wall)':>7}{'fedavg':>7}{'mask/fa':>8}{'srv/fa':>7}"
        f"{'max err':>9}{'bound':>9}"
    )
    print(header)
    print("-" * len(header))
    failed = False
    for size in sizes:
        length = SIZES[size] if size in SIZES else int(size)
        for n in sites:
            hood = n if args.degree is None else min(n, args.degree + 1)
            t = min(max(2, int(args.threshold * hood) + 1), hood - args.dropouts)
            degree = args.degree if args.degree is not None and args.degree < n - 1 else None
            r = one_round(length, n, t, args.dropouts, seed=n, degree=degree)
            ok = r["err"] <= r["bound"]
            failed |= not ok
            print(
                f"{size:<9}{length:>11,}{n:>4}{t:>4}{r['setup']:>7.3f}{r['mask']:>7.3f}"
                f"{r['mask_wall']:>7.3f}{r['sum']:>7.3f}{r['unmask']:>7.3f}"
                f"{r['unmask_wall']:>7.3f}{r['fedavg']:>7.3f}{r['mask'] / r['fedavg']:>8.2f}"
                f"{(r['sum'] + r['unmask']) / r['fedavg']:>7.2f}"
                f"{r['err']:>9.1e}{r['bound']:>9.1e}{'' if ok else '  ERROR ABOVE BOUND'}",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
