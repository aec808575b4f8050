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
the shell).  A second table runs Flower's own SecAgg+ (``SecAggPlusWorkflow`` +
``secaggplus_mod`` on the legacy ``NumPyClient`` path, the only one it supports) on
updates of the same shapes, in this process, and compares whole rounds (``--no-flower``
skips it).

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
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

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


# --------------------------------------------------------------------------------------
# Flower's own SecAgg+ (legacy path: NumPyClient + secaggplus_mod, SecAggPlusWorkflow), run
# in this process over a grid that hands every message straight to the sites' ClientApps, so
# the sites' and the server's CPU seconds can be told apart without Ray or gRPC in the way.
# --------------------------------------------------------------------------------------


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Per-tensor float shapes of a torchvision model (Flower's clients send lists)."""
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    return [tuple(v.shape) for v in model.state_dict().values() if v.is_floating_point()]


class DirectGrid(Grid):
    """A Flower ``Grid`` that calls each node's ClientApp in this process.

    Every call is timed (CPU seconds of this process) and charged to the node it ran on;
    whatever else the workflow spends is the server's.
    """

    def __init__(self, apps: dict, node_ids: list[int]) -> None:
        from flwr.app import Context, RecordDict
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity

        # Flower stamps the run and sender of new messages from the task's identity.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self._run = Run.create_empty(1)
        self.apps = apps
        self.node_ids = node_ids
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in node_ids}
        self.client_cpu = {n: 0.0 for n in node_ids}
        self.replies: dict[str, object] = {}
        self.bytes = 0

    # the Grid interface -----------------------------------------------------------
    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's Run
        self._run = run

    @property
    def run(self):  # noqa: ANN201 - Flower's Run
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages) -> list[str]:  # noqa: ANN001
        """Deliver each message as its serialised bytes, as the wire would."""
        import uuid

        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        def wire(msg):  # noqa: ANN001, ANN202
            data = message_to_proto(msg).SerializeToString()
            self.bytes += len(data)
            return message_from_proto(ProtoMessage.FromString(data))

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg.metadata.__dict__["_run_id"] = 1
            msg.metadata.__dict__["_src_node_id"] = 1
            node = msg.metadata.dst_node_id
            delivered = wire(msg)
            started = time.process_time()
            reply = wire(self.apps[node](delivered, self.contexts[node]))
            self.client_cpu[node] += time.process_time() - started
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list:  # noqa: ANN001
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None) -> list:  # noqa: ANN001
        return self.pull_messages(self.push_messages(messages))


def _client_fn_for(site):  # noqa: ANN001, ANN202 - a Flower NumPyClient
    from flwr.app import Context

    def client_fn(context: Context):  # noqa: ANN202 - Flower inspects this signature
        return site.to_client()

    return client_fn


def flower_round(shapes: list[tuple[int, ...]], n: int, threshold: int, *, secure: bool,
                 seed: int) -> dict:
    """One fit round of Flower's legacy FedAvg, with or without SecAgg+; CPU seconds."""
    import logging

    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.default_workflows import default_fit_workflow

    FLOWER_LOGGER.setLevel(logging.WARNING)
    rng = np.random.default_rng(seed)
    base = [rng.normal(0.0, 0.05, s).astype(np.float32) for s in shapes]
    node_ids = list(range(101, 101 + n))

    class Site(NumPyClient):
        def __init__(self, scale: float, examples: int) -> None:
            self.scale, self.examples = scale, examples

        def fit(self, parameters, config):  # noqa: ANN001, ANN201
            return [b * np.float32(self.scale) for b in base], self.examples, {}

    apps = {}
    for i, node in enumerate(node_ids):
        site = Site(1.0 + 0.1 * i, 100 + 10 * i)
        apps[node] = ClientApp(client_fn=_client_fn_for(site),
                               mods=[secaggplus_mod] if secure else [])
    grid = DirectGrid(apps, node_ids)
    strategy = LegacyFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                            min_available_clients=n,
                            initial_parameters=ndarrays_to_parameters(base))
    context = LegacyContext(Context(1, 1, {}, RecordDict(), {}), config=ServerConfig(1),
                            strategy=strategy, client_manager=SimpleClientManager())
    for node in node_ids:
        context.client_manager.register(GridClientProxy(node_id=node, grid=grid, run_id=1))
    context.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
        strategy.initial_parameters, keep_input=True)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: 1, Key.START_TIME: time.time()})
    workflow = (SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=threshold)
                if secure else default_fit_workflow)
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    workflow(grid, context)
    total_cpu = time.process_time() - started_cpu
    wall = time.perf_counter() - started_wall
    clients = sum(grid.client_cpu.values())
    result = [np.asarray(a) for a in
              context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()]
    weights = np.array([100 + 10 * i for i in range(n)], dtype=np.float64)
    scales = np.array([1.0 + 0.1 * i for i in range(n)])
    factor = float(np.dot(weights, scales) / weights.sum())
    err = max(float(np.abs(r.astype(np.float64) - b.astype(np.float64) * factor).max())
              for r, b in zip(result, base, strict=True))
    return {"client": clients / n, "server": total_cpu - clients, "wall": wall, "err": err,
            "dtype": str(result[0].dtype)}


def gpu_mask_seconds(length: int, n: int, device: str, *, repeats: int = 3) -> dict:
    """One site masking its update on ``device``: encode + n masks + copy back, seconds.

    The update starts on the device (where training left it); the masked ``uint32`` vector
    ends in host memory, ready to send.  The keystream is fedrad's AES-256-CTR, computed
    with torch (:mod:`fedrad.common.secagg.torch_masks`), bit-identical to the CPU path.
    """
    import os as _os

    import torch

    from fedrad.common.secagg import DEFAULT_CLIP
    from fedrad.common.secagg.torch_masks import apply_masks_torch

    dev = torch.device(device)
    update = torch.randn(length, device=dev) * 0.05
    seeds = [_os.urandom(32) for _ in range(n)]  # n - 1 neighbours + the self mask
    scale = 2.0 ** 16 * 0.1  # a site's share of the weights, times the fixed-point scale
    times = []
    for _ in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fixed = torch.round(torch.clamp(update.double() * scale, -DEFAULT_CLIP * scale,
                                        DEFAULT_CLIP * scale)).to(torch.int64) & 0xFFFFFFFF
        apply_masks_torch(fixed, add=seeds[: n // 2], subtract=seeds[n // 2:],
                          chunk=1 << 24)
        host = fixed.to(torch.int32).cpu().numpy().view(np.uint32)
        times.append(time.perf_counter() - started)
        del host
    return {"mask": statistics.median(times[1:])}


def fedrad_round(n: int, *, secure: bool, seed: int, model: str = "resnet18") -> dict:
    """One round of fedrad's own ServerApp logic and ClientApps, CPU seconds.

    ``run_federation`` drives the real ClientApps (secure aggregation on or off) over the
    same in-process grid as Flower's rounds; only the sites' training and evaluation are
    replaced by fixed updates and counts, so what is timed is fedrad's messaging, masking,
    validation, aggregation and checkpointing.  A fedrad round also evaluates (round 0 and
    after training: two more model broadcasts), which Flower's fit round does not.
    """
    import tempfile

    import torch

    import fedrad.client.client_app as client_app_module
    from fedrad.client.client_app import SiteContext, make_client_app
    from fedrad.common.config import load_settings
    from fedrad.common.metrics import count_outcomes, counts_to_metrics
    from fedrad.server.server_app import run_federation

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 50)
    probs = np.clip(labels * 0.5 + rng.uniform(0, 0.5, 50), 0, 1)
    counts = count_outcomes(np.stack([1 - probs, probs], axis=1), labels, bins=1000)

    def train_on_site(arrays, settings, site, server_round=1, **_kw):  # noqa: ANN001, ANN202
        i = int(site.site_id.split("-")[1])
        scale = np.float32(1.0 + 0.001 * i)
        out = {k: (v.numpy() * scale).astype(v.numpy().dtype) if v.numpy().dtype.kind == "f"
               else v.numpy() for k, v in arrays.items()}
        from flwr.app import Array, ArrayRecord

        record = ArrayRecord({k: Array(np.array(v, order="C")) for k, v in out.items()})
        return record, {"num-examples": 100 + 10 * i, "train-loss": 0.5, "train-seconds": 0.0}

    def evaluate_on_site(arrays, settings, site):  # noqa: ANN001, ANN202
        return {"num-examples": counts.n, **counts_to_metrics(counts)}

    saved = {name: getattr(client_app_module, name) for name in
             ("train_on_site", "evaluate_on_site", "training_sample_count")}
    client_app_module.train_on_site = train_on_site
    client_app_module.evaluate_on_site = evaluate_on_site
    client_app_module.training_sample_count = (
        lambda settings, site: 100 + 10 * int(site.site_id.split("-")[1]))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sites = {i: SiteContext(f"site-{i}", Path(tmp) / f"s{i}") for i in range(n)}
            node_ids = list(range(101, 101 + n))
            app = make_client_app(sites, threads=1)
            grid = DirectGrid({node: app for node in node_ids}, node_ids)
            for i, node in enumerate(node_ids):
                grid.contexts[node].node_config = {"partition-id": i}
            settings = load_settings({"model": model, "num-server-rounds": 1,
                                      "min-sites": n, "secure-aggregation": secure,
                                      "out-dir": str(Path(tmp) / "out")})
            started = time.process_time()
            run_federation(grid, settings)
            total = time.process_time() - started
    finally:
        for name, value in saved.items():
            setattr(client_app_module, name, value)
    clients = sum(grid.client_cpu.values())
    return {"client": clients / n, "server": total - clients, "total": total,
            "bytes": grid.bytes}


def compare_with_flower(ours: dict[tuple[str, int], tuple[dict, int]]) -> bool:
    """Print Flower's SecAgg+ against fedrad's for the same sizes and site counts.

    Both run one round in this process; Flower's messages are serialised both ways as on the
    wire.  ``flower plain`` is Flower's legacy FedAvg round without secure aggregation (all
    sites' CPU + the server's), ``flower secagg+`` the same round with ``secaggplus_mod`` and
    ``SecAggPlusWorkflow``.  fedrad's round is Flower's plain round plus fedrad's protocol
    cost from the table above (n x (setup + mask) + sum + unmask - fedavg): its masked
    vectors travel in the same Flower messages as plain weights.
    """
    print()
    print("# Flower SecAgg+ vs fedrad, one round, CPU seconds (all sites + server)")
    header = (f"{'model':<9}{'n':>4}{'t':>4}{'fl plain':>9}{'fl sa+':>8}{'fl +cost':>9}"
              f"{'fedrad':>8}{'fr +cost':>9}{'speedup':>8}{'fl err':>9}{'fl dtype':>9}")
    print(header)
    print("-" * len(header))
    failed = False
    for (size, n), (r, t) in ours.items():
        if size not in SIZES:
            continue
        shapes = model_shapes(size)
        plain = flower_round(shapes, n, t, secure=False, seed=n)
        secure = flower_round(shapes, n, t, secure=True, seed=n)
        plain_total = plain["client"] * n + plain["server"]
        secure_total = secure["client"] * n + secure["server"]
        ours_cost = n * (r["setup"] + r["mask"]) + r["sum"] + r["unmask"] - r["fedavg"]
        ours_total = plain_total + ours_cost
        flower_cost = secure_total - plain_total
        speedup = secure_total / ours_total
        print(f"{size:<9}{n:>4}{t:>4}{plain_total:>9.2f}{secure_total:>8.2f}{flower_cost:>9.2f}"
              f"{ours_total:>8.2f}{ours_cost:>9.2f}{speedup:>7.2f}x{secure['err']:>9.1e}"
              f"{secure['dtype']:>9}", flush=True)
    print("speedup = Flower SecAgg+ round / fedrad secure round (target >= 3x); "
          "'+cost' = what secure aggregation adds to the plain round")
    print()
    print("# the same, end to end with fedrad's own ServerApp logic and ClientApps (a fedrad "
          "round also evaluates twice), CPU seconds")
    header = (f"{'model':<9}{'n':>4}{'fr plain':>9}{'fr secure':>10}{'fr +cost':>9}"
              f"{'fl plain':>9}{'fl sa+':>8}{'fl +cost':>9}{'round':>8}{'+cost':>8}")
    print(header)
    print("-" * len(header))
    for (size, n), (_r, t) in ours.items():
        if size not in SIZES:
            continue
        plain = fedrad_round(n, secure=False, seed=n, model=size)["total"]
        secure = fedrad_round(n, secure=True, seed=n, model=size)["total"]
        shapes = model_shapes(size)
        fl = [flower_round(shapes, n, t, secure=s, seed=n) for s in (False, True)]
        fl_plain, fl_secure = (r["client"] * n + r["server"] for r in fl)
        print(f"{size:<9}{n:>4}{plain:>9.2f}{secure:>10.2f}{secure - plain:>9.2f}"
              f"{fl_plain:>9.2f}{fl_secure:>8.2f}{fl_secure - fl_plain:>9.2f}"
              f"{fl_secure / secure:>7.2f}x{(fl_secure - fl_plain) / (secure - plain):>7.1f}x",
              flush=True)
    print("round = Flower SecAgg+ round / fedrad secure round; +cost = what secure "
          "aggregation adds to each one's plain round, Flower's over fedrad's")
    return failed


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
    parser.add_argument("--device", default=None,
                        help="also time masking on this torch device (e.g. cuda)")
    parser.add_argument("--no-flower", action="store_true",
                        help="skip the comparison with Flower's own SecAgg+")
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
    ours: dict[tuple[str, int], tuple[dict, int]] = {}
    for size in sizes:
        length = SIZES[size] if size in SIZES else int(size)
        for n in sites:
            hood = n if args.degree is None else min(n, args.degree + 1)
            t = min(max(2, int(args.threshold * hood) + 1), hood - args.dropouts)
            degree = args.degree if args.degree is not None and args.degree < n - 1 else None
            r = one_round(length, n, t, args.dropouts, seed=n, degree=degree)
            ok = r["err"] <= r["bound"]
            failed |= not ok
            ours[(size, n)] = (r, t)
            print(
                f"{size:<9}{length:>11,}{n:>4}{t:>4}{r['setup']:>7.3f}{r['mask']:>7.3f}"
                f"{r['mask_wall']:>7.3f}{r['sum']:>7.3f}{r['unmask']:>7.3f}"
                f"{r['unmask_wall']:>7.3f}{r['fedavg']:>7.3f}{r['mask'] / r['fedavg']:>8.2f}"
                f"{(r['sum'] + r['unmask']) / r['fedavg']:>7.2f}"
                f"{r['err']:>9.1e}{r['bound']:>9.1e}{'' if ok else '  ERROR ABOVE BOUND'}",
                flush=True,
            )
    if args.device:
        print()
        print(f"# masking on {args.device}: encode + masks + copy to host, seconds per site "
              "(median of 3, after one warm-up)")
        print(f"{'model':<9}{'n':>4}{'cpu mask':>10}{'device':>10}{'ratio':>8}")
        for (size, n), (r, _t) in ours.items():
            length = SIZES[size] if size in SIZES else int(size)
            g = gpu_mask_seconds(length, n, args.device)
            print(f"{size:<9}{n:>4}{r['mask']:>10.3f}{g['mask']:>10.4f}"
                  f"{r['mask'] / g['mask']:>7.1f}x", flush=True)
    if not args.no_flower:
        failed |= compare_with_flower(ours)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
