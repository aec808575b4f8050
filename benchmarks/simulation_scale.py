"""Simulation scale: seconds per round, peak memory and federated overhead for N sites.

For every site count (``--sites 5,10,20,50``) and aggregation mode (``--secure``, the
default setting of fedrad, and/or ``--plain``, ``secure-aggregation=false``), one child
process runs fedrad's federated training through Flower's simulation engine
(:func:`fedrad.simulations.engine.run_in_simulation` with ``make_server_app`` and
``make_client_app``): ResNet-18 at 28 px, ``--rounds`` rounds, every site training one
local epoch on its own prepared cache and then scoring the new global model on its
held-out split.  The caches are written once from PneumoniaMNIST (IID, ``--images-per-site``
images each, as DICOM with the sites' scanner profiles, then ``prepare_site`` exactly as in
``fedrad demo``) under ``--cache-root`` (``/tmp/fedrad-scale``) and reused by later runs.

Columns
-------
``s/round``
    Wall seconds per round after the first (the mean of rounds 2..R: the first round also
    starts the Ray actors and imports torch in them; it is shown as ``round 1``).  In plain
    rounds the sites score each global model when it comes with the next round's
    training, so the last round also sends every site the final model to score: one
    evaluation more per site than any other round (and the local baseline's rounds) does;
    there the mean is of rounds 2..R-1 (``--rounds``, 4 by default).
``local``
    The same work without Flower, measured in the same child on the same caches and
    settings: the sites' local training (``train_on_site``) and evaluation
    (``evaluate_on_site``, the very functions the ClientApp calls) of all N sites, run
    by a pool of as many worker processes as the simulation has Ray actors (one per core,
    one torch thread each: two at a time on 2 cores, as the simulation does), each site
    one task.  Seconds per round, the mean of two rounds after a warm-up round, measured
    just before the simulation (in a child of its own, so that the simulation's process
    tree and memory are the simulation's alone) and again just after it in the
    simulation's child; the two are averaged (the machine's speed drifts, and a drift
    during the run then weighs on both sides alike; ``--json`` keeps both).
``overhead``
    ``s/round / local``: what Flower, the messages (a 45 MB model to and from every site),
    aggregation, secure aggregation's extra trips and the server's checkpoint add.
``peak MB``
    Peak proportional set size (PSS, from ``/proc/PID/smaps_rollup``; shared pages such as
    Ray's object store and the memory-mapped caches are split among the processes that map
    them, so the sum is not inflated) of the whole process tree during the simulation: the
    driver, the GCS and raylet, and every Ray worker and actor; sampled every
    ``--pss-interval`` seconds (3 s: reading ``smaps_rollup`` walks each process's page
    tables, ~25 ms per 1.5 GB process, which at 0.5 s would take a tenth of a core away
    from the run it measures).  ``RSS MB`` sums RSS (from the cheap ``/proc/PID/statm``,
    every 0.5 s) over the same tree (shared pages counted once per process);
    ``driver`` is the peak PSS of the driver alone (the ServerApp, Flower's in-memory
    SuperLink state holding every message and reply, and the Ray driver).
``procs``
    The most processes seen in the tree at once (how many Ray workers/actors there were).
``CPU s/rd``
    CPU seconds of the whole tree per round (rounds 2..R), against the local baseline's
    CPU seconds per round (``local CPU``); ``CPU ovh`` is their ratio, the overhead in
    work done, which a machine shared with other jobs distorts far less than wall time.
``drift``
    The local baseline after the simulation over the one before it: how much the
    machine's speed moved during the run (1.00: not at all).

Usage (fedrad must be importable)::

    python benchmarks/simulation_scale.py                           # 5,10,20,50 sites, secure
    python benchmarks/simulation_scale.py --sites 5 --rounds 2 --images-per-site 40  # quick
    python benchmarks/simulation_scale.py --sites 10 --secure --plain
    python benchmarks/simulation_scale.py --sites 10 --plain --images-per-site 0  # whole split
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _federation import process_tree  # noqa: E402  (shared with the tests)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/pneumoniamnist/pneumoniamnist.npz"
if not DEFAULT_DATA.is_file():
    DEFAULT_DATA = Path("/work/shared/data/pneumoniamnist/pneumoniamnist.npz")
_CLK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- measuring


def _memory_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _rss_kb(pid: int) -> int:
    """Resident set size from ``/proc/PID/statm`` (cheap, unlike ``smaps_rollup``)."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE_KB


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


class TreeSampler(threading.Thread):
    """Samples PSS, RSS and CPU time of a process tree in the background."""

    def __init__(self, root: int | None = None, interval: float = 0.5,
                 pss_interval: float = 3.0) -> None:
        super().__init__(daemon=True)
        self.root = root or os.getpid()
        self.interval = interval
        #: PSS (``smaps_rollup``) is read at most this often; CPU and RSS every sample
        self.pss_interval = pss_interval
        self._pss_at = float("-inf")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.cpu_first: dict[int, int] = {}
        self.cpu_last: dict[int, int] = {}
        self.own_cpu = 0.0  # CPU seconds the sampling thread itself used (in the driver)
        self.reset()

    def reset(self) -> None:
        """Start a new phase: peaks and CPU counters from now on."""
        with self._lock:
            self.peak_pss = self.peak_rss = self.peak_procs = self.peak_root_pss = 0
            self.cpu_first, self.cpu_last = {}, {}
            self._new_phase = True
        self.sample(pss=True)

    def cpu_seconds(self) -> float:
        """CPU seconds used by the tree since :meth:`reset` (as last sampled)."""
        self.sample(pss=False)
        with self._lock:
            ticks = sum(self.cpu_last[p] - self.cpu_first.get(p, 0) for p in self.cpu_last)
        return ticks / _CLK

    def sample(self, pss: bool | None = None) -> None:
        """Take one sample now (PSS too when ``pss`` or ``pss_interval`` has passed)."""
        now = time.monotonic()
        with_pss = pss if pss is not None else now - self._pss_at >= self.pss_interval
        if with_pss:
            self._pss_at = now
        total_pss = rss = procs = root_pss = 0
        cpu: dict[int, int] = {}
        for pid in process_tree(self.root):
            try:
                if with_pss:
                    r, p = _memory_kb(pid)
                else:
                    r, p = _rss_kb(pid), 0
                cpu[pid] = _cpu_ticks(pid)
            except (OSError, ValueError, IndexError):
                continue  # the process ended between listing and reading: not counted
            rss, total_pss, procs = rss + r, total_pss + p, procs + 1
            if pid == self.root:
                root_pss = p
        pss_kb = total_pss
        with self._lock:
            for pid, ticks in cpu.items():
                # processes alive at reset count from there; later ones from their birth
                self.cpu_first.setdefault(pid, ticks if self._new_phase else 0)
                self.cpu_last[pid] = ticks
            self._new_phase = False
            self.peak_pss = max(self.peak_pss, pss_kb)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, procs)
            self.peak_root_pss = max(self.peak_root_pss, root_pss)

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
            self.own_cpu = time.thread_time()

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------- the caches


def prepare_caches(num_sites: int, images_per_site: int, root: Path, data: Path,
                   seed: int = 0) -> tuple[dict[int, Any], int, list[str]]:
    """Write and prepare ``num_sites`` IID PneumoniaMNIST sites (reused when present).

    ``images_per_site`` 0 splits the whole training split among the sites.
    """
    from fedrad.client.client_app import SiteContext
    from fedrad.common.config import load_settings
    from fedrad.simulations.demo import MEDMNIST_DEFAULTS, prepare_federation
    from fedrad.simulations.medmnist import write_medmnist_federation

    where = root / f"{num_sites}-sites-{images_per_site or 'all'}"
    done = where / "caches.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        sites = {int(k): SiteContext(site_id=v[0], data_dir=Path(v[1]))
                 for k, v in saved["sites"].items()}
        return sites, saved["num_classes"], saved["class_names"]
    federation = write_medmnist_federation(
        data, where / "dicom", num_sites=num_sites, scheme="iid", seed=seed,
        max_train_per_site=images_per_site or None, max_test=16, workers=2, overwrite=True)
    base = load_settings({**MEDMNIST_DEFAULTS, "min-sites": 1,
                          "num-classes": len(federation.class_names),
                          "class-names": ",".join(federation.class_names)})
    _, sites, _ = prepare_federation(federation, where / "caches", base, workers=1,
                                     say=lambda s: None)
    done.write_text(json.dumps({
        "sites": {k: [s.site_id, str(s.data_dir)] for k, s in sites.items()},
        "num_classes": len(federation.class_names),
        "class_names": list(federation.class_names),
    }))
    return sites, len(federation.class_names), list(federation.class_names)


# --------------------------------------------------------------------------- the baseline


_WORKER_STATE: dict[str, Any] = {}


def _baseline_init(state: dict[str, Any], run_config: dict[str, Any]) -> None:
    import torch
    from flwr.app import ArrayRecord

    from fedrad.common.config import load_settings

    torch.set_num_threads(1)
    _WORKER_STATE["arrays"] = ArrayRecord(state)
    _WORKER_STATE["settings"] = load_settings(run_config)


def _baseline_site(task: tuple[Any, int]) -> float:
    """One site's local round without Flower: train, then evaluate (what the ClientApp runs)."""
    site, server_round = task
    from fedrad.client.client_app import evaluate_on_site, train_on_site

    arrays, settings = _WORKER_STATE["arrays"], _WORKER_STATE["settings"]
    started = time.perf_counter()
    train_on_site(arrays, settings, site, server_round)
    evaluate_on_site(arrays, settings, site)
    return time.perf_counter() - started


def run_baseline(sites: dict[int, Any], settings: Any, workers: int, rounds: int,
                 sampler: TreeSampler) -> dict[str, float]:
    """Seconds and CPU seconds per round of all sites' local work, ``workers`` at a time.

    The global model reaches each worker once (not timed); every round then trains and
    evaluates every site from it, one site per task, as the simulation's actors do.
    """
    import multiprocessing as mp

    from fedrad.server.server_app import initial_model

    state = initial_model(settings).state_dict()
    walls, cpus = [], []
    with mp.get_context("spawn").Pool(workers, initializer=_baseline_init,
                                      initargs=(state, settings.to_run_config())) as pool:
        for server_round in range(1, max(rounds, 2) + 1):
            tasks = [(sites[k], server_round) for k in sorted(sites)]
            sampler.reset()
            started = time.perf_counter()
            pool.map(_baseline_site, tasks, chunksize=1)
            walls.append(time.perf_counter() - started)
            cpus.append(sampler.cpu_seconds())
    timed = slice(1, None)  # the first round warms up the workers (imports, cache opening)
    return {"s_per_round": statistics.mean(walls[timed]),
            "cpu_per_round": statistics.mean(cpus[timed]),
            "peak_pss_mb": sampler.peak_pss / 1024}


# --------------------------------------------------------------------------- one run


def _setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _settings_for(args: argparse.Namespace, n: int, secure: bool, num_classes: int,
                  class_names: list[str], out_dir: Path) -> Any:
    from fedrad.common.config import load_settings
    from fedrad.simulations.demo import MEDMNIST_DEFAULTS

    return load_settings({
        **MEDMNIST_DEFAULTS, "num-server-rounds": args.rounds, "min-sites": n,
        "num-classes": num_classes, "class-names": ",".join(class_names),
        "secure-aggregation": secure, "out-dir": str(out_dir), "central-eval-dir": "",
        "local-epochs": args.local_epochs, "batch-size": args.batch_size,
        **dict(_setting(kv) for kv in args.set),
    })


def run_baseline_only(args: argparse.Namespace) -> dict[str, Any]:
    """The local baseline alone, in this (child) process: what a run measures before its
    simulation starts (see ``local`` in the module docstring)."""
    from fedrad.simulations.engine import simulation_backend_config

    n = args.one_sites
    sites, num_classes, class_names = prepare_caches(n, args.images_per_site,
                                                     Path(args.cache_root), Path(args.data_path))
    settings = _settings_for(args, n, args.one_mode == "secure", num_classes, class_names,
                             Path(args.cache_root) / "runs" / f"{n}-baseline")
    sampler = TreeSampler(pss_interval=args.pss_interval)
    sampler.start()
    backend = simulation_backend_config(n)  # as many workers as the simulation has actors
    actors = int(os.cpu_count() or 1) // int(backend["client_resources"]["num_cpus"])
    base = run_baseline(sites, settings, max(actors, 1), 3, sampler)
    sampler.stop()
    return base


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One site count and mode, in this (child) process; returns the measurements."""
    import torch
    from flwr.serverapp import ServerApp

    from fedrad.client.client_app import make_client_app
    from fedrad.server.server_app import run_federation
    from fedrad.simulations.engine import run_in_simulation, simulation_backend_config

    n = args.one_sites
    secure = args.one_mode == "secure"
    sites, num_classes, class_names = prepare_caches(n, args.images_per_site,
                                                     Path(args.cache_root), Path(args.data_path))
    out_dir = Path(args.cache_root) / "runs" / f"{n}-{args.one_mode}"
    settings = _settings_for(args, n, secure, num_classes, class_names, out_dir)
    sampler = TreeSampler(pss_interval=args.pss_interval)
    sampler.start()

    stamps: list[float] = []
    answered: list[int] = []
    failures: list[int] = []

    cpu_stamps: list[float] = []

    class RoundEnds(logging.Handler):
        """Stamps the end of every round: the server's "round r/R done" line (checkpoint
        saved).  Not the round reports: in plain rounds a round's report waits for the
        sites' evaluation of its model, which comes with the next round's training."""

        def emit(self, record: logging.LogRecord) -> None:
            if str(record.msg).startswith("round %d/%d done"):
                stamps.append(time.perf_counter())
                cpu_stamps.append(sampler.cpu_seconds() - sampler.own_cpu)

    server_log = logging.getLogger("fedrad.server.server_app")
    server_log.setLevel(logging.INFO)
    server_log.addHandler(RoundEnds())

    def on_round(report: Any) -> None:
        pooled = report.rows.get("pooled")
        answered.append(int(pooled["n"]) if pooled else -1)
        failures.append(len(report.failures))

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:  # make_server_app's main, with a start stamp
        stamps.append(time.perf_counter())
        run_federation(grid, settings, on_round, run_id=context.run_id)

    backend = simulation_backend_config(n)
    actors = int(os.cpu_count() or 1) // int(backend["client_resources"]["num_cpus"])
    torch.set_num_threads(int(os.cpu_count() or 1))
    sampler.reset()
    started = time.perf_counter()
    run_in_simulation(server_app, make_client_app(sites, threads=1), num_sites=n)
    total = time.perf_counter() - started
    sim_cpu = sampler.cpu_seconds()
    sim = {"peak_pss_mb": sampler.peak_pss / 1024, "peak_rss_mb": sampler.peak_rss / 1024,
           "driver_pss_mb": sampler.peak_root_pss / 1024,
           "procs": sampler.peak_procs}
    rounds = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    round_cpu = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:], strict=False)]  # rounds 2..R
    result: dict[str, Any] = {
        "sites": n, "mode": args.one_mode, "rounds_done": len(rounds), "total_s": total,
        "startup_s": stamps[0] - started if stamps else float("nan"),
        "round_s": rounds, "eval_examples": answered,
        "failures": failures, **sim,
        "cpu_s": sim_cpu, "sampler_cpu_s": sampler.own_cpu,
    }
    # plain rounds: the sites score each model with the next round's training, so the last
    # round alone also sends every site the final model to score (one more evaluation
    # each than the local baseline's rounds have); it is left out of the steady rounds
    rides = (settings.evaluate_with_training and not settings.secure_aggregation
             and settings.fraction_train >= 1.0)
    steady = (rounds[1:-1] if rides and len(rounds) >= 3 else rounds[1:]) or rounds
    result["steady_rounds"] = len(steady)
    result["s_per_round"] = statistics.mean(steady) if steady else float("nan")
    steady_cpu = (round_cpu[:-1] if rides and len(round_cpu) >= 2 else round_cpu) or round_cpu
    result["cpu_per_round"] = statistics.mean(steady_cpu) if steady_cpu else float("nan")
    if not args.no_baseline:
        base = run_baseline(sites, settings, max(actors, 1), 3, sampler)
        result["local_after_s"] = result["local_s"] = base["s_per_round"]
        result["local_after_cpu_s"] = result["local_cpu_s"] = base["cpu_per_round"]
        result["local_peak_pss_mb"] = base["peak_pss_mb"]
        result["overhead"] = result["s_per_round"] / base["s_per_round"]
    sampler.stop()
    return result


# --------------------------------------------------------------------------- the table


def _row(r: dict[str, Any]) -> str:
    first = r["round_s"][0] if r["round_s"] else float("nan")
    return (f"{r['sites']:>5} {r['mode']:>6} {r['rounds_done']:>3} {r['startup_s']:>8.1f} "
            f"{first:>8.1f} {r['s_per_round']:>8.2f} {r.get('local_s', float('nan')):>7.2f} "
            f"{r.get('overhead', float('nan')):>8.2f} {r['peak_pss_mb']:>8.0f} "
            f"{r['peak_rss_mb']:>7.0f} {r.get('driver_pss_mb', float('nan')):>7.0f} "
            f"{r['procs']:>5} {r['cpu_per_round']:>8.1f} "
            f"{r.get('local_cpu_s', float('nan')):>9.1f} "
            f"{r['cpu_per_round'] / r.get('local_cpu_s', float('nan')):>7.2f} "
            f"{r.get('local_after_s', float('nan')) / r.get('local_before_s', float('nan')):>6.2f}")


HEADER = (f"{'sites':>5} {'mode':>6} {'rds':>3} {'start s':>8} {'round 1':>8} {'s/round':>8} "
          f"{'local':>7} {'overhead':>8} {'peak MB':>8} {'RSS MB':>7} {'driver':>7} {'procs':>5} "
          f"{'CPU s/rd':>8} {'local CPU':>9} {'CPU ovh':>7} {'drift':>6}")


def _child(command: list[str], n: int, mode: str, what: str) -> dict[str, Any] | None:
    """Run one child (``--one-...``) and return its RESULT, or print why it failed."""
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"{n:>5} {mode:>6} {what} FAILED (exit {proc.returncode}):\n"
              f"{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="5,10,20,50", help="comma-separated site counts")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds per run (plain runs time rounds 2..R-1: 4 or more)")
    parser.add_argument("--images-per-site", type=int, default=90,
                        help="training+validation images per site (PneumoniaMNIST has 4,708 "
                             "training images: 50 sites x 90 fit); 0 splits all of them "
                             "among the sites (10 sites: ~470 each)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--secure", action="store_true", help="secure aggregation (default)")
    parser.add_argument("--plain", action="store_true", help="secure-aggregation=false")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the local (no Flower) baseline and the overhead column")
    parser.add_argument("--cache-root", default="/tmp/fedrad-scale")
    parser.add_argument("--data-path", default=str(DEFAULT_DATA))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another run setting, e.g. --set secagg-degree=8 (repeatable)")
    parser.add_argument("--pss-interval", type=float, default=3.0,
                        help="seconds between PSS readings (smaps_rollup is costly)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--one-sites", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-mode", help=argparse.SUPPRESS)
    parser.add_argument("--one-baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one_sites:
        import logging

        logging.basicConfig(level=logging.WARNING)
        one = run_baseline_only if args.one_baseline else run_one
        print("RESULT " + json.dumps(one(args)), flush=True)
        return

    modes = [m for m, on in (("secure", args.secure), ("plain", args.plain)) if on] or ["secure"]
    counts = [int(s) for s in args.sites.split(",") if s.strip()]
    print(f"fedrad simulation scale: ResNet-18, 28 px, {args.rounds} rounds, "
          f"{args.images_per_site} images/site, {args.local_epochs} local epoch(s), batch "
          f"{args.batch_size}{''.join(' ' + kv for kv in args.set)}; "
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    print(HEADER, flush=True)
    for n in counts:
        for mode in modes:
            child = [sys.executable, __file__, "--one-sites", str(n), "--one-mode", mode,
                     "--rounds", str(args.rounds), "--images-per-site", str(args.images_per_site),
                     "--local-epochs", str(args.local_epochs), "--batch-size",
                     str(args.batch_size), "--cache-root", args.cache_root,
                     "--data-path", args.data_path, "--pss-interval", str(args.pss_interval)]
            child += [f"--set={kv}" for kv in args.set]
            before = None
            if not args.no_baseline:  # the local work just before the simulation too
                before = _child(child + ["--one-baseline"], n, mode, "baseline")
                if before is None:
                    continue
            child += ["--no-baseline"] if args.no_baseline else []
            result = _child(child, n, mode, "simulation")
            if result is None:
                continue
            if before is not None:  # the mean of before and after: a drift weighs on both
                result["local_before_s"] = before["s_per_round"]
                result["local_before_cpu_s"] = before["cpu_per_round"]
                result["local_s"] = (before["s_per_round"] + result["local_after_s"]) / 2
                result["local_cpu_s"] = (before["cpu_per_round"]
                                         + result["local_after_cpu_s"]) / 2
                result["local_peak_pss_mb"] = max(before["peak_pss_mb"],
                                                  result["local_peak_pss_mb"])
                result["overhead"] = result["s_per_round"] / result["local_s"]
            results.append(result)
            print(_row(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
