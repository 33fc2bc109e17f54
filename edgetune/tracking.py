"""MLflow: one parent run per pipeline execution, one child run per stage.

The Prefect flow opens the parent run and hands its id to the stages through the environment
variable EDGETUNE_PARENT_RUN_ID (DVC passes the environment through to each stage's command).
A stage run outside the flow (plain `dvc repro`, `dvc exp run`) logs a top-level run instead.
Default store: sqlite:///mlflow.db in the working directory; MLFLOW_TRACKING_URI wins.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from edgetune.config import BadInput

PARENT_ENV = "EDGETUNE_PARENT_RUN_ID"
DEFAULT_URI = "sqlite:///mlflow.db"


def configure(experiment: str):
    """Point MLflow at the store and experiment; returns the mlflow module. A store that
    cannot be used is bad input (BadInput naming the URI), reported before any work."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    origin = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking store"
    check_reachable(uri, origin)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment)
    except mlflow.MlflowException as e:  # e.g. an unknown URI scheme, a deleted experiment
        raise BadInput(f"{origin} {uri!r}: {e.message}") from None
    return mlflow


def check_reachable(uri: str, origin: str, timeout_s: float = 5.0) -> None:
    """Fail fast when an http(s) tracking server does not accept connections: MLflow's client
    would retry with backoff for minutes. Skipped behind a proxy (only the proxy is reachable)."""
    url = urllib.parse.urlsplit(uri)
    if url.scheme not in ("http", "https"):
        return
    if urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(url.hostname or ""):
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise BadInput(f"{origin} {uri!r}: cannot reach the MLflow server ({e.strerror or e})") from None


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


def close_stale_run(run_id: str, successor: str) -> None:
    """A killed attempt's run stays RUNNING: mark it KILLED, tagged with the run that resumed it."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.MlflowException:  # another store, or deleted: nothing to close
        return
    client.set_tag(run_id, "edgetune.resumed_by", successor)
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, "KILLED")
