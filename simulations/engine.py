"""Run a fedrad ServerApp and ClientApp through Flower's simulation engine.

How the sites share the machine: Flower's Ray backend creates one actor (a Python process
with torch and the model code loaded) per ``client_resources`` share of the Ray cluster,
whatever the number of simulated sites, and every site's messages are run by whichever
actor is free.  :func:`simulation_backend_config` sizes that pool: one actor per
``cpus_per_site`` cores, never more actors than sites (a 3-site study on a 16-core machine
starts 3 actors, not 16), and on a GPU machine every actor gets an equal share of the GPU.
Memory therefore grows with the number of actors, not with the number of sites: 50 sites
on 2 cores run in the same two actors as 5 sites do.  Ray's shared object store, through
which each message (the whole model) passes on its way to and from an actor, is capped
at :data:`OBJECT_STORE_BYTES` instead of Ray's default of 30 % of the machine's memory,
and the models' values pass through it out of band (:mod:`fedrad.common.ray_transport`).
Messages the ServerApp pushes reach the actors at once (:func:`deliver_on_push`), not at
Flower's next 0.1 s look at its message store, and the sites' replies reach the ServerApp
at once (:func:`wake_on_reply`), not at its next poll of the store (up to 0.1 s later).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable
from queue import Empty
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

__all__ = ["OBJECT_STORE_BYTES", "available_cpus", "deliver_on_push", "run_in_simulation",
           "simulation_backend_config", "simulation_actors", "wake_on_reply"]

log = logging.getLogger(__name__)

#: Ray object store size: a few in-flight messages per actor (ResNet-18 is 45 MB, a
#: DenseNet-121 28 MB, a ViT-tiny 22 MB); Ray spills to disk rather than fail beyond it.
OBJECT_STORE_BYTES = 1 << 30


def available_cpus() -> int:
    """CPU cores this process may run on: its affinity mask, capped by a container's quota."""
    from fedrad.common.training import cpu_budget

    return cpu_budget()


def simulation_actors(num_sites: int, *, cpus_per_site: int = 1,
                      cpus: int | None = None) -> int:
    """How many sites train at a time: one per ``cpus_per_site`` cores, at most one per site."""
    cpus = available_cpus() if cpus is None else cpus
    return max(1, min(max(num_sites, 1), cpus // max(cpus_per_site, 1)))


def simulation_backend_config(num_sites: int, *, cpus_per_site: int = 1,
                              cpus: int | None = None, gpu: bool | None = None) -> dict:
    """Ray backend settings: a pool of :func:`simulation_actors` actors, one per share.

    The Ray cluster is given exactly ``actors x cpus_per_site`` CPUs (and, with a GPU,
    each actor ``1 / actors`` of it, at least a tenth), so Flower's pool, which fills the
    cluster, has that many actors.
    """
    actors = simulation_actors(num_sites, cpus_per_site=cpus_per_site, cpus=cpus)
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    resources: dict[str, float] = {"num_cpus": cpus_per_site}
    init_args: dict = {"include_dashboard": False, "log_to_driver": False,
                       "logging_level": logging.ERROR, "num_cpus": actors * cpus_per_site,
                       "object_store_memory": OBJECT_STORE_BYTES}
    if gpu:
        actors = min(actors, 10)
        resources["num_gpus"] = max(0.1, math.floor(100 / actors) / 100)
        init_args["num_cpus"] = actors * cpus_per_site
    else:
        resources["num_gpus"] = 0.0
        init_args["num_gpus"] = 0
    return {"client_resources": resources, "init_args": init_args}


_PUSHED = threading.Event()  # set whenever the ServerApp pushes messages (see below)


def _deliver(state, queue, nodes_mapping, f_stop: threading.Event) -> None:  # noqa: ANN001
    """Flower's ``add_messages_to_queue``, woken by the ServerApp's push.

    Flower's version looks for new messages every 0.1 s: every step of a round (one in
    plain rounds, several under secure aggregation) waited 0-0.1 s before its messages
    reached the sites' actors.  This one looks again as soon as messages are pushed,
    and otherwise every 0.1 s as before.
    """
    while not f_stop.is_set():
        _PUSHED.clear()  # a push from here on wakes the wait below
        for node_id in nodes_mapping.keys():
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        _PUSHED.wait(0.1)


def deliver_on_push() -> bool:
    """Have Flower's simulation hand pushed messages to the sites at once (idempotent).

    Returns False, changing nothing, if this Flower lacks the two functions it replaces.
    """
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:
        return False
    push = getattr(InMemoryGrid, "push_messages", None)
    if push is None or not hasattr(vce_api, "add_messages_to_queue"):
        return False
    if not getattr(push, "_fedrad_wakes", False):
        InMemoryGrid.push_messages = waking(push)
    vce_api.add_messages_to_queue = _deliver
    return True


def waking(push: Callable[..., Any]) -> Callable[..., Any]:
    """``push`` (a grid's ``push_messages``), then a wake-up of :func:`_deliver`'s loop."""

    @functools.wraps(push)
    def push_messages(self, messages):  # noqa: ANN001, ANN202
        try:
            return push(self, messages)
        finally:
            _PUSHED.set()

    push_messages._fedrad_wakes = True  # type: ignore[attr-defined]
    return push_messages


def _store_replies(state, queue, f_stop: threading.Event) -> None:  # noqa: ANN001
    """Flower's ``put_message_into_state``, telling the ServerApp of each reply it stores.

    Flower's version stores the sites' replies in the in-process message store, where the
    ServerApp finds them at its next poll: the last reply of every round step waited up to
    0.1 s (the poll interval backs off while nothing arrives).  This one also sets
    :data:`~fedrad.server.secure_rounds.REPLIES_STORED`, which ends the ServerApp's wait.
    """
    from fedrad.server.secure_rounds import REPLIES_STORED

    while not f_stop.is_set():
        try:
            reply = queue.get(timeout=1.0)
        except Empty:
            continue
        state.store_message_res(reply)
        REPLIES_STORED.set()


def wake_on_reply() -> bool:
    """Have Flower's simulation wake the ServerApp as each reply is stored (idempotent).

    Returns False, changing nothing, if this Flower lacks the function it replaces.
    """
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    if not hasattr(vce_api, "put_message_into_state"):
        return False
    vce_api.put_message_into_state = _store_replies
    return True


def run_in_simulation(server_app: ServerApp, client_app: ClientApp, num_sites: int,
                      *, cpus_per_site: int = 1) -> None:
    """Run the apps with ``num_sites`` simulated SuperNodes (Ray backend), in-process.

    Each simulated site runs in one of :func:`simulation_actors` actors with
    ``cpus_per_site`` CPU threads, so on a 2-core machine two sites train at a time.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from fedrad.common.ray_transport import forget_shared_sends, use_out_of_band_arrays

    # what the ServerApp sends, a model put in the object store once for all its sites
    # (the sites' actors send their replies out of band too)
    use_out_of_band_arrays(share_sends=True)
    deliver_on_push()
    wake_on_reply()
    config = simulation_backend_config(num_sites, cpus_per_site=cpus_per_site)
    log.info("simulation: %d sites on %d Ray actors", num_sites,
             int(config["init_args"]["num_cpus"]) // cpus_per_site)
    forget_shared_sends()  # references from an earlier simulation's Ray session
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_sites,
                backend_config=config,
            )
    finally:
        forget_shared_sends()
