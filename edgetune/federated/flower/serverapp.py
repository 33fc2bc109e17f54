"""The ServerApp: edgetune's round loop (engine.run_federation) over Flower SuperNodes.

It reads the job the finetune stage wrote (job.py), builds the method and the server's model
as the local engine does, finds the SuperNodes owning the clients, runs every round through
FlowerClients, saves the global state after each round (out/checkpoint), logs each round's
metrics to the stage's MLflow run, exports the final model (out/merged) and leaves the round
logs in <out>.flower/history.json for the stage. With the stage's resume folder in the job
(resume.py), it saves every round there too and, restarted after a crash, goes on from the last
saved round, as the local backend does.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from edgetune.federated.flower.job import JOB_ENV, FlowerJob, history_file

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The job comes from the run config (`flwr run`) or, in the Simulation Engine, the environment."""
    serve(grid, FlowerJob.read(str(context.run_config.get("job") or os.environ.get(JOB_ENV, ""))))


def serve(grid, job: FlowerJob) -> None:
    from edgetune.devices import peak_rss_mb
    from edgetune.federated.engine import run_federation
    from edgetune.federated.flower.transport import FlowerClients
    from edgetune.federated.setup import engine_options, prepare
    from edgetune.tasks import get_task

    cfg = job.params
    method, model = prepare(Path(job.model), get_task(job.task), cfg, job.num_clients, cfg.sample_rate,
                            job.model_runtime)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    clients = FlowerClients(grid, job, method)
    out = Path(job.out)
    state, history = run_federation(method, model, clients, checkpoint_dir=out / "checkpoint",
                                    on_round=round_logger(job), resume=job.resume_folder(),
                                    **engine_options(cfg, clients))
    method.export(model, state, out)
    summary = {"trainable_params": trainable, "peak_rss_mb": peak_rss_mb()}
    if method.privacy:
        summary["dp_epsilon"] = method.privacy.metrics()["dp_epsilon"]
    path = history_file(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"history": [asdict(h) for h in history], "summary": summary}, indent=1))


def round_logger(job: FlowerJob):
    """Each round's metrics into the stage's MLflow run (step = round), if the job names one."""
    if not job.run_id:
        return None
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(job.tracking_uri)

    def log(r) -> None:
        now = int(time.time() * 1000)
        client.log_batch(job.run_id, metrics=[Metric(k, float(v), now, r.round) for k, v in r.metrics().items()])

    return log

