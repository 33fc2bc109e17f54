"""MLflow: one parent run per pipeline execution, one child run per stage.

The Prefect flow opens the parent run and hands its id to the stages through the environment
variable EDGETUNE_PARENT_RUN_ID (DVC passes the environment through to each stage's command).
A stage run outside the flow (plain `dvc repro`, `dvc exp run`) logs a top-level run instead.
Default store: sqlite:///mlflow.db in the working directory; MLFLOW_TRACKING_URI wins.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

PARENT_ENV = "EDGETUNE_PARENT_RUN_ID"
DEFAULT_URI = "sqlite:///mlflow.db"


def configure(experiment: str):
    """Point MLflow at the store and experiment; returns the mlflow module."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_URI)
    mlflow.set_experiment(experiment)
    return mlflow


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def base_tags(stage: str, cached: bool) -> dict[str, str]:
    return {"edgetune.stage": stage, "edgetune.cached": str(cached).lower(),
            "mlflow.source.git.commit": git_commit()}


@contextmanager
def stage_run(stage: str, experiment: str, params: dict[str, object]):
    """A child run of the flow's parent (or a top-level run); FAILED if the body raises."""
    mlflow = configure(experiment)
    parent = os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(run_name=stage, parent_run_id=parent,
                          tags=base_tags(stage, cached=False)) as run:
        mlflow.log_params(params)
        yield run


def log_cached_stage(stage: str, experiment: str, parent_id: str, params: dict[str, object],
                     metrics_file: Path) -> None:
    """Link a stage DVC skipped to this pipeline run: a child run with its cached metrics.
    Uses the client API, since the parent run is the active fluent run."""
    mlflow = configure(experiment)
    client = mlflow.MlflowClient()
    run = client.create_run(
        mlflow.get_experiment_by_name(experiment).experiment_id, run_name=stage,
        tags={**base_tags(stage, cached=True), "mlflow.parentRunId": parent_id},
    )
    try:
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        if metrics_file.is_file():
            for key, value in numeric(json.loads(metrics_file.read_text())).items():
                client.log_metric(run.info.run_id, key, value)
            client.log_artifact(run.info.run_id, str(metrics_file))
    finally:
        client.set_terminated(run.info.run_id)


def numeric(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Flatten nested metric dicts to {'a.b': float}, dropping non-numbers."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(numeric(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out
