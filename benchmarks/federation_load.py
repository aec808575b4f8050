"""Federation load: one SuperLink, N sites as real processes on loopback, ResNet-18 rounds.

Every site runs exactly what a hospital runs, ``fedrad site run`` (its SuperNode with
process isolation, fedrad's SuperExec and the approval-checked ClientApp), with TLS and a
registered site key from ``fedrad certs``, its own approved-apps list, egress log, Flower
home and a tiny prepared cache (``--images-per-site`` PneumoniaMNIST images at 28 px, IID,
written as DICOM and prepared as in ``fedrad demo``; reused under ``--cache-root``).  The
coordinator runs ``flower-superlink`` and ``flwr run`` of a bundle the sites approved,
``--rounds`` rounds of ResNet-18, once per mode (``--plain``: ``secure-aggregation=false``,
``--secure``: SecAgg+; both by default).  All sites share this machine's cores, so each
site's torch trains with ``--site-threads`` threads (its ``cpu-threads`` node config,
default 1): a hospital's site has its own machine, and 20 sites with a thread per core
each would spend the cores spinning on each other.

Printed per round:

``s``
    Wall seconds of the round, from the ServerApp's own log (``logs/server.jsonl``): from
    the end of the previous round's metrics (round 1: from the run's start line) to this
    round's ``round r/R done`` line (its checkpoint is saved).
``train max`` / ``train sum``
    The sites' local training seconds (``trained on N samples ... img/s`` in each site's
    log, the ClientApp's own measurement of ``train_local``): the slowest site (the round's
    critical path: the sites train at the same time) and the sum over sites.
``overhead``
    ``s - train max``: what the round costs beyond the slowest site's training (process
    starts, messages, secure aggregation's extra trips, aggregation, checkpoint, polls).
``KB/site``
    Bytes per site sent in the round, from the sites' egress logs (mean, and the spread).
``link MB`` / ``app MB``
    Peak RSS (and PSS) of the SuperLink process, and of the ServerApp process with its
    children, during the round (``/proc`` sampled every ``--sample`` seconds).
``site MB``
    Peak PSS summed over every site process tree (SuperNode, SuperExec, ClientApps).
``CPU s link/app/sites``
    CPU seconds used during the round by the SuperLink process, the ServerApp tree and all
    site trees together (from ``/proc/PID/stat`` at each sample; a process that ended
    between two samples loses at most one interval).  On a machine with C cores the round
    cannot take less than their sum / C seconds.

No update may be lost: for every round the script checks that the ServerApp got a training
reply from every site (its ``training replies`` / ``secure weighted mean of N sites`` line),
that the pooled row's ``n`` is the sum of all sites' held-out samples, and that every site's
egress log holds its training reply for the round, and that no site logged an error reply.

Memory guard: if the machine's available memory falls under ``--min-free-gb`` the run is
stopped (every process started here is stopped in any case).

Usage (fedrad installed, from the repository root)::

    python benchmarks/federation_load.py                          # 20 sites, 3 rounds, both
    python benchmarks/federation_load.py --sites 3 --rounds 1 --plain   # quick check
    FEDRAD_SITE_LAUNCHER=cold python benchmarks/federation_load.py ...  # see client/warm.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from _federation import BIN, LoopbackFederation, children_map, free_port, process_tree  # noqa: E402
from simulation_scale import DEFAULT_DATA, _cpu_ticks, _memory_kb, prepare_caches  # noqa: E402

TRAINED = re.compile(r"site (\S+) round (\d+): trained on (\d+) samples, loss \S+, "
                     r"([\d.]+) img/s")
PLAIN_REPLIES = re.compile(r"round (\d+): (\d+) training replies, (\d+) failures")
SECURE_MEAN = re.compile(r"round (\d+): secure weighted mean of (\d+) sites \((\d+) dropped\), "
                         r"(\d+) samples")
ROUND_DONE = re.compile(r"round (\d+)/(\d+) done")


# --------------------------------------------------------------------------- sampling


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


class Sampler(threading.Thread):
    """Samples the SuperLink, the ServerApp tree and all site trees; guards free memory."""

    def __init__(self, link_pid: int, site_pids: list[int], interval: float,
                 min_free_gb: float) -> None:
        super().__init__(daemon=True)
        self.link_pid, self.site_pids = link_pid, site_pids
        self.interval, self.min_free_gb = interval, min_free_gb
        self.samples: list[dict[str, float]] = []
        self.low_memory: str | None = None
        self._stop_event = threading.Event()
        self._ticks: dict[str, dict[int, int]] = {"link": {}, "app": {}, "sites": {}}

    def _cpu(self, group: str, pid: int) -> None:
        """Remember ``pid``'s CPU ticks so far (a process that ended keeps its last)."""
        try:
            ticks = _cpu_ticks(pid)
        except (OSError, ValueError, IndexError):
            return  # it has just ended: its last reading stands
        self._ticks[group][pid] = ticks

    def sample(self) -> None:
        children = children_map()  # one pass over /proc per sample

        def tree(root: int) -> list[int]:
            return process_tree(root, children)

        link_rss = link_pss = app_rss = app_pss = 0
        for pid in tree(self.link_pid):
            try:
                rss, pss = _memory_kb(pid)
            except (OSError, ValueError):
                continue
            if pid == self.link_pid:
                link_rss, link_pss = rss, pss
                self._cpu("link", pid)
            elif "serverapp" in _cmdline(pid):
                # the ServerApp process and, below it, anything it starts
                for sub in tree(pid):
                    try:
                        r, p = _memory_kb(sub)
                    except (OSError, ValueError):
                        continue
                    app_rss, app_pss = app_rss + r, app_pss + p
                    self._cpu("app", sub)
        site_pss = 0
        for root in self.site_pids:
            for pid in tree(root):
                try:
                    site_pss += _memory_kb(pid)[1]
                except (OSError, ValueError):
                    continue
                self._cpu("sites", pid)
        clk = os.sysconf("SC_CLK_TCK")
        cpu = {f"cpu_{g}": sum(t.values()) / clk for g, t in self._ticks.items()}
        free = mem_available_gb()
        self.samples.append({"t": time.time(), "link_rss": link_rss / 1024,
                             "link_pss": link_pss / 1024, "app_rss": app_rss / 1024,
                             "app_pss": app_pss / 1024, "site_pss": site_pss / 1024,
                             "free_gb": free, **cpu})
        if free < self.min_free_gb and self.low_memory is None:
            self.low_memory = f"available memory fell to {free:.1f} GB"

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()

    def peaks(self, start: float, end: float) -> dict[str, float]:
        inside = [s for s in self.samples if start <= s["t"] <= end] or self.samples[-1:]
        keys = ("link_rss", "link_pss", "app_rss", "app_pss", "site_pss")
        out = {k: max(s[k] for s in inside) for k in keys}
        out["free_gb"] = min(s["free_gb"] for s in inside)
        before = [s for s in self.samples if s["t"] <= start] or self.samples[:1]
        for group in ("link", "app", "sites"):  # CPU seconds used inside the window
            out[f"cpu_{group}"] = inside[-1][f"cpu_{group}"] - before[-1][f"cpu_{group}"]
        return out


# --------------------------------------------------------------------------- set-up

#: ``fedrad site run`` without the rest of fedrad's CLI: the same ``run_site`` call and
#: logging as ``fedrad site run`` (client/cli.py); neither imports torch.
RUNNER = ("import logging, sys; from pathlib import Path;"
          "from fedrad.client.approval import run_site;"
          "logging.basicConfig(level=logging.INFO,"
          " format='fedrad site run %(levelname)s %(message)s');"
          "a = sys.argv[1:]; i = a.index('--approved'); approved = Path(a[i + 1]); del a[i:i + 2];"
          "j = a.index('--runtime-port'); port = int(a[j + 1]); del a[j:j + 2];"
          "sys.exit(run_site(a, approved, runtime_port=port))")


def site_command(kind: str) -> list[str]:
    if kind == "cli":
        return [str(BIN / "fedrad"), "site", "run"]
    return [sys.executable, "-c", RUNNER]



def build_bundle(work: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """An app folder holding fedrad's pyproject.toml and the bundle ``flwr build`` makes."""
    app = work / "fedradapp"
    app.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    out = work / "build"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    result = subprocess.run([str(BIN / "flwr"), "build", "--app", str(app)], cwd=out,
                            capture_output=True, text=True, timeout=120, env=env)
    if result.returncode != 0:
        raise SystemExit(f"flwr build failed:\n{result.stdout}{result.stderr}")
    (fab,) = out.glob("*.fab")
    return app, fab


def _utc(stamp: str) -> float:
    return datetime.strptime(stamp.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def server_log(out_dir: Path) -> list[tuple[float, str]]:
    path = out_dir / "logs" / "server.jsonl"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        lines.append((_utc(entry["time"]), entry["message"]))
    return lines


def held_out_counts(caches: list[Path], settings: Any) -> int:
    """Sum of the sites' held-out samples (what the pooled row's n must be)."""
    from fedrad.client.client_app import _load_site_cache, _site_split

    return sum(len(_site_split(_load_site_cache(str(cache)), settings)[1]) for cache in caches)


# --------------------------------------------------------------------------- one mode


def run_mode(args: argparse.Namespace, secure: bool, caches: list[tuple[str, Path]],
             class_names: list[str]) -> dict[str, Any]:
    from fedrad.client.approval import approve
    from fedrad.common.config import load_settings
    from fedrad.server import certs

    mode = "secure" if secure else "plain"
    n = len(caches)
    work = Path(args.out) / f"{n}-sites-{mode}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    study = work / "study"
    certs.init_study(study, server_names=["localhost"], server_ips=["127.0.0.1"])
    keys = [certs.add_site(study, site_id) for site_id, _ in caches]
    fed = LoopbackFederation(work, study=study)
    out_dir = work / "run-out"
    run_config = (f'num-server-rounds={args.rounds} image-size=28 stem="standard" '
                  f'model="resnet18" local-epochs=1 batch-size=64 min-sites={n} '
                  f'secure-aggregation={"true" if secure else "false"} '
                  f'class-names="{",".join(class_names)}" out-dir="{out_dir}" '
                  f'round-timeout={args.round_timeout}')
    settings = load_settings({"image-size": 28, "stem": "standard", "min-sites": n,
                              "class-names": ",".join(class_names)})
    expected_n = held_out_counts([c for _, c in caches], settings)
    sampler: Sampler | None = None
    site_procs: list[subprocess.Popen] = []
    flwr_output = ""
    stopped = ""
    started = time.time()
    try:
        link = fed.start_superlink()
        app, fab = build_bundle(work, fed.env)
        for key in keys:
            reg = fed.flwr("supernode", "register", str(key.public_key), "loopback",
                           timeout=120)
            if reg.returncode != 0:
                raise SystemExit(fed.diagnostics("register failed", reg.stdout + reg.stderr))
        for i, ((_, cache), key) in enumerate(zip(caches, keys, strict=True)):
            site_dir = work / "sites" / key.site_id
            (site_dir / "flwr-home").mkdir(parents=True)
            allow = site_dir / "approved-apps.json"
            approve(allow, str(fab))
            egress = site_dir / "egress.jsonl"
            args_ = [*site_command(args.site_command), "--approved", str(allow),
                     "--runtime-port", str(free_port()),
                     "--superlink", f"127.0.0.1:{fed.port}",
                     "--root-certificates", str(fed.study.ca_cert),
                     "--auth-supernode-private-key", str(key.private_key),
                     "--node-config",
                     f'data-dir="{cache}" site-id="{key.site_id}" egress-log="{egress}" '
                     f'cpu-threads={args.site_threads}']
            log_file = open(fed.logs / f"site-{i + 1}.log", "w")  # noqa: SIM115
            site_env = {**fed.env, "FLWR_HOME": str(site_dir / "flwr-home")}
            if args.launcher:
                site_env["FEDRAD_SITE_LAUNCHER"] = args.launcher
            if args.poll:
                site_env["FEDRAD_SUPERNODE_POLL"] = str(args.poll)
            proc = subprocess.Popen(args_, stdout=log_file, stderr=subprocess.STDOUT,
                                    cwd=site_dir, start_new_session=True, env=site_env)
            fed.procs.append(proc)
            site_procs.append(proc)
        sampler = Sampler(link.pid, [p.pid for p in site_procs], args.sample, args.min_free_gb)
        sampler.start()
        # the sites connect and sit idle: their memory and polling CPU over the last half
        time.sleep(args.idle_seconds / 2)
        idle_at = time.time()
        time.sleep(args.idle_seconds / 2)
        idle = sampler.peaks(idle_at, time.time())
        span = max(time.time() - idle_at, 1e-9)
        print(f"[{mode}] {n} sites up; idle: SuperLink {idle['link_rss']:.0f} MB RSS, "
              f"{100 * idle['cpu_link'] / span:.0f} % CPU; sites {idle['site_pss']:.0f} MB PSS "
              f"in all, {100 * idle['cpu_sites'] / span:.0f} % CPU; "
              f"{idle['free_gb']:.1f} GB available", flush=True)
        run = subprocess.Popen([str(BIN / "flwr"), "run", str(app), "loopback", "--stream",
                                "--run-config", run_config], env=fed.env, cwd=work,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        fed.procs.append(run)
        chunks: list[str] = []
        reader = threading.Thread(target=lambda: chunks.append(run.stdout.read()), daemon=True)
        reader.start()
        deadline = time.time() + args.run_timeout
        while run.poll() is None:
            # out of memory or time: stop everything, report the rounds that finished
            if sampler.low_memory:
                stopped = f"stopped: {sampler.low_memory}"
                break
            if time.time() > deadline:
                stopped = f"stopped: the run took more than {args.run_timeout} s"
                break
            dead = [i + 1 for i, p in enumerate(site_procs) if p.poll() is not None]
            if dead:
                raise SystemExit(fed.diagnostics(f"sites {dead} exited during the run"))
            time.sleep(0.5)
        reader.join(timeout=0 if stopped else 30)
        flwr_output = "".join(chunks)
        if not stopped and run.returncode != 0:
            raise SystemExit(fed.diagnostics("flwr run failed", flwr_output))
        # the last egress lines are written before the replies leave: they are all there
        time.sleep(2)
    finally:
        if sampler is not None:
            sampler.stop()
        fed.stop()
    wall = time.time() - started
    result = analyse(mode, [k.site_id for k in keys], args.rounds, out_dir, fed, sampler,
                     expected_n, wall)
    if stopped:
        result["problems"].insert(0, stopped)
    return result


def analyse(mode: str, site_ids: list[str], rounds: int, out_dir: Path, fed: LoopbackFederation,
            sampler: Sampler, expected_n: int, wall: float) -> dict[str, Any]:
    from fedrad.client.egress import read_egress_log

    n = len(site_ids)
    log_lines = server_log(out_dir)
    start = next(t for t, m in log_lines if m.startswith("strategy "))
    ends: dict[int, float] = {}
    replies: dict[int, tuple[int, int]] = {}
    for t, m in log_lines:
        if (hit := ROUND_DONE.match(m)):
            ends[int(hit.group(1))] = t
        elif (hit := PLAIN_REPLIES.match(m)):
            replies[int(hit.group(1))] = (int(hit.group(2)), int(hit.group(3)))
        elif (hit := SECURE_MEAN.match(m)):
            replies[int(hit.group(1))] = (int(hit.group(2)), int(hit.group(3)))
    problems: list[str] = []
    train: dict[int, list[float]] = {r: [] for r in range(1, rounds + 1)}
    for i in range(n):
        text = (fed.logs / f"site-{i + 1}.log").read_text()
        for hit in TRAINED.finditer(text):
            r = int(hit.group(2))
            if r in train:
                train[r].append(int(hit.group(3)) / float(hit.group(4)))
        if "REFUSED" in text:
            problems.append(f"site-{i + 1} refused the bundle")
    sent: dict[int, list[int]] = {r: [0] * n for r in range(0, rounds + 1)}
    setup = [0] * n
    for i in range(n):
        path = fed.tmp / "sites" / site_ids[i] / "egress.jsonl"
        entries = list(read_egress_log(path)) if path.is_file() else []
        trained = {e.server_round for e in entries if e.message_type == "train"
                   and e.kind == "reply"}
        for r in range(1, rounds + 1):
            if r not in trained:
                problems.append(f"site-{i + 1} has no training reply for round {r} in its log")
        for e in entries:
            if e.kind != "reply":
                problems.append(f"site-{i + 1} sent an error: {e.error}")
            if e.server_round in sent:
                sent[e.server_round][i] += e.bytes
            else:
                setup[i] += e.bytes
    pooled_n = {}
    with open(out_dir / "metrics.csv") as f:
        import csv

        for row in csv.DictReader(f):
            if row["scope"] == "pooled":
                pooled_n[int(row["round"])] = int(float(row["n"]))
    rows = []
    previous = start
    for r in range(1, rounds + 1):
        if r not in ends:
            problems.append(f"round {r} never finished")
            continue
        got, failed = replies.get(r, (0, -1))
        if got != n or failed != 0:
            problems.append(f"round {r}: {got} training replies of {n}, {failed} failed/dropped")
        if pooled_n.get(r) != expected_n:
            problems.append(f"round {r}: pooled n {pooled_n.get(r)} != {expected_n}")
        if len(train[r]) != n:
            problems.append(f"round {r}: {len(train[r])} sites logged their training")
        seconds = ends[r] - previous
        peaks = sampler.peaks(previous, ends[r])
        per_site = sent[r]
        tmax = max(train[r], default=0.0)
        rows.append({"round": r, "seconds": seconds, "train_max": tmax,
                     "train_sum": sum(train[r]), "overhead": seconds - tmax,
                     "kb_site": statistics.mean(per_site) / 1024,
                     "kb_min": min(per_site) / 1024, "kb_max": max(per_site) / 1024,
                     "replies": got, **peaks})
        previous = ends[r]
    return {"mode": mode, "sites": n, "rounds": rows, "problems": problems, "wall": wall,
            "setup_kb_site": statistics.mean(setup) / 1024 if setup else 0.0,
            "round0_kb_site": statistics.mean(sent[0]) / 1024,
            "launcher": os.environ.get("FEDRAD_SITE_LAUNCHER", "default")}


def describe(args: argparse.Namespace) -> str:
    return (f"site launcher {args.launcher or 'default (warm)'}, SuperNode poll "
            f"{args.poll or 3:g} s, sites started by {args.site_command}, "
            f"{args.site_threads} torch thread(s) per site")


def report(result: dict[str, Any]) -> None:
    print(f"\n== {result['sites']} sites, {result['mode']} "
          f"({result['launcher']}), wall {result['wall']:.0f} s, "
          f"load average {os.getloadavg()[0]:.1f} ==")
    head = (f"{'round':>5} {'s':>7} {'train max':>9} {'train sum':>9} {'overhead':>8} "
            f"{'KB/site':>9} {'(min-max)':>15} {'link MB':>13} {'app MB':>13} "
            f"{'site MB':>8} {'free GB':>7} {'CPU s link/app/sites':>21}")
    print(head)
    for row in result["rounds"]:
        print(f"{row['round']:>5} {row['seconds']:>7.1f} {row['train_max']:>9.1f} "
              f"{row['train_sum']:>9.1f} {row['overhead']:>8.1f} {row['kb_site']:>9.0f} "
              f"{row['kb_min']:>7.0f}-{row['kb_max']:<7.0f} "
              f"{row['link_rss']:>6.0f}/{row['link_pss']:<6.0f} "
              f"{row['app_rss']:>6.0f}/{row['app_pss']:<6.0f} {row['site_pss']:>8.0f} "
              f"{row['free_gb']:>7.1f} {row['cpu_link']:>7.0f}/{row['cpu_app']:.0f}/"
              f"{row['cpu_sites']:.0f}")
    if result["rounds"]:
        mean = statistics.mean
        rs = result["rounds"]
        print(f" mean {mean(r['seconds'] for r in rs):>7.1f} "
              f"{mean(r['train_max'] for r in rs):>9.1f} "
              f"{mean(r['train_sum'] for r in rs):>9.1f} "
              f"{mean(r['overhead'] for r in rs):>8.1f} {mean(r['kb_site'] for r in rs):>9.0f}")
    print(f"(MB columns: peak RSS/PSS; bytes sent outside rounds, per site: "
          f"{result['round0_kb_site'] + result['setup_kb_site']:.0f} KB)")
    if result["problems"]:
        print("PROBLEMS (lost or failed updates, or the run was stopped):\n  "
              + "\n  ".join(result["problems"]))
    else:
        print(f"every site's training reply reached the server in every round "
              f"({result['sites']} replies per round, pooled n as expected, egress logs agree)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="secure-aggregation=false")
    parser.add_argument("--secure", action="store_true", help="secure-aggregation=true")
    parser.add_argument("--images-per-site", type=int, default=24)
    parser.add_argument("--out", default="/tmp/fedrad-load")
    parser.add_argument("--cache-root", default="/tmp/fedrad-load-caches")
    parser.add_argument("--data-path", default=str(DEFAULT_DATA))
    parser.add_argument("--sample", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--idle-seconds", type=float, default=30.0,
                        help="the sites' idle time before the run (measured: the last half)")
    parser.add_argument("--min-free-gb", type=float, default=3.0)
    parser.add_argument("--round-timeout", type=float, default=900.0)
    parser.add_argument("--run-timeout", type=float, default=3600.0)
    parser.add_argument("--site-command", choices=("runner", "cli"), default="cli",
                        help="start each site with the 'fedrad site run' command (default, "
                             "what the site container runs) or with its run_site call alone")
    parser.add_argument("--launcher", choices=("warm", "cold"),
                        help="FEDRAD_SITE_LAUNCHER for the sites (default: run_site's)")
    parser.add_argument("--site-threads", type=int, default=1,
                        help="torch CPU threads per site (its cpu-threads node config)")
    parser.add_argument("--poll", type=float,
                        help="FEDRAD_SUPERNODE_POLL: the SuperNodes' idle poll in seconds "
                             "(default: Flower's 3 s)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    modes = [m for m, on in (("plain", args.plain), ("secure", args.secure)) if on]
    modes = modes or ["plain", "secure"]
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sites, _, class_names = prepare_caches(args.sites, args.images_per_site,
                                           Path(args.cache_root), Path(args.data_path))
    caches = [(sites[k].site_id, Path(sites[k].data_dir)) for k in sorted(sites)]
    results = []
    for mode in modes:
        result = run_mode(args, mode == "secure", caches, class_names)
        result["launcher"] = describe(args)
        report(result)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
