"""Flower's Simulation Engine (Ray): every client a virtual SuperNode in this machine, the same
ServerApp and ClientApp as a real deployment (finetune.flower.simulation: true).

A virtual node's node config holds only its partition-id (= client id), so the job's folders
reach the ClientApp through the messages (`sim_partitions`, `sim_model`), and the ServerApp
finds the job through EDGETUNE_FLOWER_JOB. Ray runs floor(CPUs / client_cpus) actors; each
keeps its worker (method + model) between messages, so a round costs local work, not process
starts. Needs the `simulation` extra (ray).
"""

from __future__ import annotations

import os
from pathlib import Path

from edgetune.config import RunFailed
from edgetune.federated.flower.job import JOB_ENV


def simulate(job: Path, num_clients: int, client_cpus: float, client_gpus: float = 0.0) -> None:
    """Run the job's federation with `num_clients` virtual SuperNodes (Ray must be installed:
    launch.preflight checks); raises RunFailed if the ServerApp fails."""
    from flwr.simulation import run_simulation

    from edgetune.federated.flower.clientapp import app as client_app
    from edgetune.federated.flower.serverapp import app as server_app

    os.environ[JOB_ENV] = str(Path(job).absolute())
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                       backend_config={"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
                                       "init_args": {"include_dashboard": False, "log_to_driver": False}})
    except RuntimeError as e:
        cause = e.__cause__ or e
        raise RunFailed(f"flower simulation: {type(cause).__name__}: {cause}") from None
