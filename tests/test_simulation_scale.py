"""Many simulated sites share a fixed pool of Ray actors (issue 6, "Scale")."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from fedrad.simulations.engine import (
    OBJECT_STORE_BYTES,
    simulation_actors,
    simulation_backend_config,
)

SIZE = 28


@pytest.mark.parametrize(("sites", "cpus", "actors"),
                         [(50, 2, 2), (5, 2, 2), (1, 2, 1), (3, 16, 3), (50, 16, 16)])
def test_actor_pool_follows_cores_not_sites(sites: int, cpus: int, actors: int,
                                            monkeypatch) -> None:
    from flwr.simulation.ray_transport import ray_actor

    config = simulation_backend_config(sites, cpus=cpus, gpu=False)
    init = config["init_args"]
    assert simulation_actors(sites, cpus=cpus) == actors
    assert init["num_cpus"] == actors
    assert init["object_store_memory"] == OBJECT_STORE_BYTES
    # Flower sizes its pool from the Ray cluster the init args create
    monkeypatch.setattr(ray_actor.ray, "nodes", lambda: [{
        "Alive": True, "Resources": {"CPU": float(init["num_cpus"]), "memory": 1e9}}])
    assert ray_actor.pool_size_from_resources(config["client_resources"]) == actors


def test_gpu_share_lets_every_actor_fit_on_one_gpu() -> None:
    config = simulation_backend_config(50, cpus=16, gpu=True)
    share = config["client_resources"]["num_gpus"]
    assert share == pytest.approx(0.1)
    assert config["init_args"]["num_cpus"] == 10  # 10 actors of a tenth of the GPU each
    assert simulation_backend_config(3, cpus=16, gpu=True)["client_resources"]["num_gpus"] \
        == pytest.approx(0.33)


def _write_site(path: Path, n: int, seed: int) -> Path:
    from fedrad.common.cache import write_cache

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 100, (n, SIZE, SIZE)).astype(np.uint8)
    images[labels == 1, 8:20, 8:20] += 120
    records = [{"id": f"img{i}", "label": int(label)} for i, label in enumerate(labels)]
    write_cache(path, images, labels, records=records, quarantine=[],
                meta={"num_classes": 2, "class_names": ["normal", "opacity"]})
    return path


def _actor_pids(root: int) -> set[int]:
    """Ray's ClientAppActor worker processes under ``root``.

    A process an actor forks (for the moment before it runs another program) inherits the
    actor's command line; it is not an actor, so only the topmost of each line counts.
    """
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        children.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [(root, False)]
    while todo:
        pid, under_actor = todo.pop()
        try:
            actor = b"ClientAppActor" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # the process ended while the tree was read
        if actor and not under_actor:
            found.add(pid)
        todo.extend((child, under_actor or actor) for child in children.get(pid, ()))
    return found


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_six_sites_answer_from_a_pool_of_actors(tmp_path: Path) -> None:
    from fedrad.client.client_app import SiteContext, make_client_app
    from fedrad.common.config import load_settings
    from fedrad.server.server_app import make_server_app
    from fedrad.simulations.engine import run_in_simulation

    sites = {k: SiteContext(site_id=f"site-{k + 1}",
                            data_dir=_write_site(tmp_path / f"site-{k + 1}", 10, k))
             for k in range(6)}
    settings = load_settings({
        "model": "resnet18", "image-size": SIZE, "stem": "standard", "num-server-rounds": 1,
        "local-epochs": 1, "batch-size": 8, "min-sites": 6, "secure-aggregation": False,
        "out-dir": str(tmp_path / "run"),
    })
    actors: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            actors.update(_actor_pids(os.getpid()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    reports = []
    try:
        run_in_simulation(make_server_app(settings, on_round=reports.append),
                          make_client_app(sites, threads=1), num_sites=len(sites))
    finally:
        done.set()
        watcher.join()
    assert [r.server_round for r in reports] == [1]
    assert not reports[0].failures
    rows = reports[0].rows
    assert {s for s in rows if s.startswith("site:")} == {f"site:site-{k}" for k in range(1, 7)}
    assert rows["pooled"]["n"] == sum(rows[f"site:site-{k}"]["n"] for k in range(1, 7))
    # six sites, but only as many actor processes as sites can train at a time
    assert 1 <= len(actors) <= simulation_actors(len(sites))


def test_pushed_messages_reach_the_sites_at_once_not_at_the_next_poll() -> None:
    """Flower's simulation polls its state for new messages every 0.1 s; fedrad wakes it."""
    import queue
    import time

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.superlink.grid import InMemoryGrid

    from fedrad.simulations.engine import deliver_on_push, waking

    assert deliver_on_push() and deliver_on_push()  # idempotent: wrapped once
    assert InMemoryGrid.push_messages._fedrad_wakes
    assert not hasattr(InMemoryGrid.push_messages.__wrapped__, "_fedrad_wakes")

    class State:  # the two LinkState calls the delivery loop and the push make
        def __init__(self) -> None:
            self.waiting: dict[int, list[str]] = {1: [], 2: []}
            self.lock = threading.Lock()

        def store(self, node: int, msg: str) -> None:
            with self.lock:
                self.waiting[node].append(msg)

        def get_message_ins(self, node_id: int, limit: int) -> list[str]:
            with self.lock:
                got = self.waiting[node_id][:limit]
                del self.waiting[node_id][:limit]
            return got

    class Grid:
        def __init__(self, state: State) -> None:
            self.state = state

        @waking
        def push_messages(self, messages):  # noqa: ANN001, ANN202
            for node, msg in messages:
                self.state.store(node, msg)
            return [m for _, m in messages]

    state, out, stop = State(), queue.Queue(), threading.Event()
    grid = Grid(state)
    loop = threading.Thread(target=vce_api.add_messages_to_queue,
                            args=(state, out, {1: 0, 2: 1}, stop), daemon=True)
    loop.start()
    try:
        delays = []
        for i in range(20):
            time.sleep(0.013 * (i % 7))  # pushes at any point of the 0.1 s cycle
            started = time.perf_counter()
            grid.push_messages([(1, f"a{i}"), (2, f"b{i}")])
            got = {out.get(timeout=1), out.get(timeout=1)}
            delays.append(time.perf_counter() - started)
            assert got == {f"a{i}", f"b{i}"}
        # Flower's own loop takes up to 0.1 s (0.05 s on average) to notice a push
        assert sorted(delays)[len(delays) // 2] < 0.02, delays
    finally:
        stop.set()
        loop.join(timeout=2)


def test_a_stored_reply_ends_the_servers_wait_for_replies_at_once() -> None:
    """A simulated site's reply is stored in the ServerApp's own process: the reply
    stream pulls as soon as one is stored, not at its next poll (here: never, within the
    timeout, so a stream that slept through the store would miss the reply)."""
    import queue
    import time
    from types import SimpleNamespace

    from flwr.server.superlink.fleet.vce import vce_api

    from fedrad.server.secure_rounds import ReplyStream
    from fedrad.simulations.engine import _store_replies, wake_on_reply

    assert wake_on_reply() and wake_on_reply()  # idempotent
    assert vce_api.put_message_into_state is _store_replies

    class State:  # the LinkState call the injector makes, and what the grid pulls
        def __init__(self) -> None:
            self.replies: list[SimpleNamespace] = []
            self.lock = threading.Lock()

        def store_message_res(self, reply: SimpleNamespace) -> None:
            with self.lock:
                self.replies.append(reply)

    class Grid:
        def __init__(self, state: State) -> None:
            self.state, self.pulls, self.first_pull = state, 0, threading.Event()

        def push_messages(self, messages):  # noqa: ANN001, ANN202
            return [f"m{m.metadata.dst_node_id}" for m in messages]

        def pull_messages(self, ids):  # noqa: ANN001, ANN202
            self.pulls += 1
            self.first_pull.set()
            with self.state.lock:
                got = [r for r in self.state.replies if r.metadata.reply_to_message_id in ids]
                self.state.replies = [r for r in self.state.replies if r not in got]
            return got

    class SlowPoll(ReplyStream):
        poll_start = poll_max = 600.0  # the next poll would come after the timeout

    state, replies, stop = State(), queue.Queue(), threading.Event()
    grid = Grid(state)
    injector = threading.Thread(target=vce_api.put_message_into_state,
                                args=(state, replies, stop), daemon=True)
    injector.start()
    try:
        sent = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (1, 2)]
        stream = SlowPoll(grid, sent, timeout=8.0)

        def answer() -> None:
            assert grid.first_pull.wait(5)  # the stream has pulled once and is waiting
            for n in (2, 1):
                replies.put(SimpleNamespace(metadata=SimpleNamespace(
                    reply_to_message_id=f"m{n}")))

        threading.Thread(target=answer, daemon=True).start()
        started = time.monotonic()
        got = [node for node, _ in stream]
        waited = time.monotonic() - started
        assert sorted(got) == [1, 2] and stream.missing() == []
        assert waited < 4.0, f"the replies were pulled {waited:.1f} s after the push"
    finally:
        stop.set()
        injector.join(timeout=3)
