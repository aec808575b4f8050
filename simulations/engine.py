"""Run a fedrad ServerApp and ClientApp through Flower's simulation engine."""

from __future__ import annotations

import logging
import os
import warnings

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

__all__ = ["run_in_simulation", "simulation_backend_config"]

log = logging.getLogger(__name__)


def simulation_backend_config(num_sites: int, *, cpus_per_site: int = 1) -> dict:
    """Ray backend settings: one CPU per simulated site, a GPU share when one exists."""
    import torch

    resources: dict[str, float] = {"num_cpus": cpus_per_site}
    if torch.cuda.is_available():
        resources["num_gpus"] = max(0.1, round(1.0 / max(num_sites, 1), 2))
    else:
        resources["num_gpus"] = 0.0
    return {
        "client_resources": resources,
        "init_args": {"include_dashboard": False, "log_to_driver": False,
                      "logging_level": logging.ERROR},
    }


def run_in_simulation(server_app: ServerApp, client_app: ClientApp, num_sites: int,
                      *, cpus_per_site: int = 1) -> None:
    """Run the apps with ``num_sites`` simulated SuperNodes (Ray backend), in-process.

    Each simulated site is an actor with ``cpus_per_site`` CPU threads, so on a 2-core
    machine two sites train at a time.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_sites,
            backend_config=simulation_backend_config(num_sites, cpus_per_site=cpus_per_site),
        )
