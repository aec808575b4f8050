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
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        children.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            if b"ClientAppActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            continue  # the process ended while the tree was read
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
