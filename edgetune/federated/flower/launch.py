"""The finetune stage on Flower: write the job, run the federation (Simulation Engine, a
SuperLink and SuperNodes started on loopback, or a running SuperLink), wait for it, and read
back the round logs the ServerApp left, so the stage writes the same metrics and plots as on
the local backend. The ServerApp logs each round to the stage's MLflow run itself.
flows/federation.py runs the same three steps as Prefect tasks.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

from edgetune.config import BadInput, FinetuneParams, RunFailed
from edgetune.federated.engine import RoundLog
from edgetune.federated.flower.job import FlowerJob, history_file


def finetune_on_flower(base_dir: Path, partitions: Path, task: str, cfg: FinetuneParams, out_dir: Path,
                       num_clients: int, resume=None, runtime=None) -> tuple[dict, list[RoundLog]]:
    """`resume` (resume.ResumeFolder): the ServerApp goes on after its last saved round.
    runtime (config.ModelParams): model.device / dtype of the ServerApp and every ClientApp."""
    preflight(base_dir, cfg, num_clients)
    job, path = write_job(base_dir, partitions, task, cfg, out_dir, num_clients, resume)
    if runtime is not None:
        from edgetune.devices import check

        check(runtime.device)  # bad input here, not in every ClientApp
        job.runtime = runtime.model_dump(mode="json")
        job.write(path)
    with ExitStack() as stack:
        home = open_federation(stack, job, path, partitions, cfg)
        run_job(home, path, cfg, num_clients)
    return read_history(out_dir, cfg, num_clients)


def open_federation(stack: ExitStack, job: FlowerJob, path: Path, partitions: Path,
                    cfg: FinetuneParams) -> Path | None:
    """The FLWR_HOME that `flwr run` submits from: a SuperLink and SuperNodes started on
    loopback (stopped when `stack` closes) or a connection to finetune.flower.superlink;
    None on the Simulation Engine, which needs neither."""
    from edgetune.federated.flower.deploy import LoopbackFederation, write_connection

    flower = cfg.flower
    if flower.simulation:
        return None
    if flower.superlink is None:
        nodes = loopback_nodes(job, partitions, flower.nodes)
        return stack.enter_context(LoopbackFederation(path.parent, nodes)).home
    home = path.parent / "flwr-home"
    write_connection(home, flower.superlink, flower.insecure, flower.root_certificates)
    return home


def run_job(home: Path | None, path: Path, cfg: FinetuneParams, num_clients: int) -> dict:
    """Run the job at `path` until it ends; Flower's record of the run ({} in simulation)."""
    from edgetune.federated.flower.deploy import submit
    from edgetune.federated.flower.simulation import simulate

    if cfg.flower.simulation:
        simulate(path, num_clients, cfg.flower.client_cpus, cfg.flower.client_gpus)
        return {}
    return submit(home, path, run_timeout(cfg))


def preflight(base_dir: Path, cfg: FinetuneParams, num_clients: int) -> None:
    """Bad input before any process starts (BadInput, exit 2): the base model folder, more
    loopback SuperNodes than clients, an unreachable SuperLink, the Simulation Engine without Ray."""
    import socket

    from edgetune.models import model_folder

    model_folder(Path(base_dir))
    flower = cfg.flower
    if flower.simulation:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise BadInput("finetune.flower.simulation: needs Ray (pip install 'edgetune[simulation]')") from None
    elif flower.superlink is None and flower.nodes > num_clients:
        raise BadInput(f"finetune.flower.nodes: {flower.nodes} SuperNodes for {num_clients} clients; "
                       "every node must own at least one client")
    elif flower.superlink is not None:
        host, _, port = flower.superlink.rpartition(":")
        if not host or not port.isdigit():
            raise BadInput(f"finetune.flower.superlink: {flower.superlink!r}; expected host:port")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise BadInput(f"finetune.flower.superlink {flower.superlink!r}: cannot reach the SuperLink "
                           f"({e.strerror or e})") from None
    if flower.root_certificates and not Path(flower.root_certificates).is_file():
        raise BadInput(f"finetune.flower.root_certificates: {flower.root_certificates} is not a file")


def write_job(base_dir: Path, partitions: Path, task: str, cfg: FinetuneParams, out_dir: Path,
              num_clients: int, resume=None) -> tuple[FlowerJob, Path]:
    """The job JSON in <out>.flower/ (beside the DVC out, with the processes' logs)."""
    folder = Path(f"{Path(out_dir).absolute()}.flower")
    job = FlowerJob(finetune=cfg.model_dump(mode="json"), task=task, model=str(Path(base_dir).absolute()),
                    out=str(Path(out_dir).absolute()), num_clients=num_clients,
                    connect_timeout=cfg.flower.connect_timeout, round_timeout=cfg.flower.round_timeout,
                    resume=[str(resume.folder.absolute()), resume.fingerprint] if resume else None,
                    **tracking())
    if cfg.flower.simulation:  # virtual nodes have no node config: the folders travel with the job
        job.extra = {"sim_partitions": str(Path(partitions).absolute()), "sim_model": job.model}
    history_file(out_dir).unlink(missing_ok=True)
    return job, job.write(folder / "job.json")


def loopback_nodes(job: FlowerJob, partitions: Path, nodes: int) -> list[dict[str, object]]:
    """Node configs of `nodes` SuperNodes on this machine, each owning a block of clients."""
    from edgetune.federated.flower.deploy import client_blocks

    return [{"partitions": str(Path(partitions).absolute()), "model": job.model,
             "clients": ",".join(map(str, block))} for block in client_blocks(job.num_clients, nodes)]


def run_timeout(cfg: FinetuneParams) -> float:
    return cfg.flower.connect_timeout + cfg.num_rounds * (cfg.round_retries + 1) * cfg.flower.round_timeout


def tracking() -> dict:
    """The active MLflow run and an absolute store URI, for the ServerApp to log rounds to."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return {}
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).absolute())
    return {"tracking_uri": uri, "run_id": run.info.run_id}


def read_history(out_dir: Path, cfg: FinetuneParams, num_clients: int) -> tuple[dict, list[RoundLog]]:
    """(summary, history) from the ServerApp's history.json, as the local backend returns them."""
    from edgetune.federated.setup import summarize

    path = history_file(out_dir)
    if not path.is_file():
        raise RunFailed(f"flower: the run ended without {path} (see {path.parent}/logs)")
    record = json.loads(path.read_text())
    history = [RoundLog(**h) for h in record["history"]]
    summary = summarize(history, cfg, record["summary"]["trainable_params"], num_clients,
                        record["summary"].get("dp_epsilon"))
    for key in ("wire_bytes_down", "wire_bytes_up", "bytes_catchup"):
        summary[f"{key}_total"] = sum(h.extra.get(key, 0.0) for h in history)
    summary["server_peak_rss_mb"] = record["summary"]["peak_rss_mb"]
    summary["client_peak_rss_mb"] = max(h.extra.get("client_peak_rss_mb", 0.0) for h in history)
    summary["peak_rss_mb"] = summary["client_peak_rss_mb"]  # a device's memory: its ClientApp process
    summary["backend"] = "flower-simulation" if cfg.flower.simulation else "flower"
    return summary, history
