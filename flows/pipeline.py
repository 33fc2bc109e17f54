"""The end-to-end pipeline: a Prefect flow that runs the DVC stages in DAG order.

    python -m flows.pipeline            # or: edgetune run / make run

Each stage is a Prefect task that calls `dvc repro --single-item <stage>`, so DVC decides what
is stale: unchanged stages are skipped (the task ends in a Completed state named "Cached") and
are still linked to this run in MLflow with their cached metrics. Transient failures (a held
DVC lock, a locked MLflow database) are retried once; any other stage failure fails the flow
with the stage's own error. One MLflow parent run holds all params and the headline metrics;
each stage logs its child run under it (EDGETUNE_PARENT_RUN_ID). The parent run is named by
what sets it apart (edgetune/tracking.py: parent_run_name) and lists the datasets and models.

Without PREFECT_API_URL, Prefect starts a temporary local server for the run.

Several pipelines sharing one DVC cache (the cells of flows/benchmark.py) set
EDGETUNE_STAGE_LOCKS to a folder: a stage then runs under a file lock named by its signature (its
params and its upstream stages' signatures), so when two pipelines reach the same stage with the
same inputs, one runs it and the other waits and takes it from DVC's run-cache.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from edgetune import tracking
from edgetune.cli import run_main
from edgetune.config import flatten, load_params

EXTRA_TAGS_ENV = "EDGETUNE_RUN_TAGS"  # JSON object of extra parent-run tags (flows/benchmark.py)
STAGE_LOCKS_ENV = "EDGETUNE_STAGE_LOCKS"  # folder of per-signature stage locks (flows/benchmark.py)
TRANSIENT_MARKERS = ("Unable to acquire lock", "database is locked", "Connection refused")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str):
        self.transient = any(m in tail for m in TRANSIENT_MARKERS)
        super().__init__(f"stage {stage!r} failed (exit {returncode}):\n{tail}")


def upstream(dvc_file: str = "dvc.yaml") -> dict[str, list[str]]:
    """Each stage -> the stages whose outputs it depends on (dvc.yaml's order)."""
    stages = yaml.safe_load(Path(dvc_file).read_text())["stages"]

    def paths(entries):
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    outs = {s: paths(d.get("outs")) + paths(d.get("metrics")) + paths(d.get("plots"))
            for s, d in stages.items()}

    def feeds(a: str, b: str) -> bool:  # does stage a produce something b depends on?
        return any(dep == o or dep.startswith(o.rstrip("/") + "/")
                   for dep in paths(stages[b].get("deps")) for o in outs[a])

    return {b: [a for a in stages if a != b and feeds(a, b)] for b in stages}


def dag_order(dvc_file: str = "dvc.yaml") -> list[str]:
    """Stages sorted so each comes after the stages whose outputs it depends on
    (ties keep dvc.yaml's order)."""
    feeders = upstream(dvc_file)
    order: list[str] = []
    pending = list(feeders)
    while pending:
        ready = next(s for s in pending if not any(f in pending for f in feeders[s]))
        order.append(ready)
        pending.remove(ready)
    return order


def stage_signatures(params, dvc_file: str = "dvc.yaml") -> dict[str, str]:
    """Each stage -> a hash of the params it reads and of its upstream stages' signatures: two
    copies of the pipeline code whose stage has the same signature give it the same inputs."""
    feeders, signatures = upstream(dvc_file), {}
    for stage in dag_order(dvc_file):
        raw = json.dumps({"stage": stage, "params": section_params(params, stage, dvc_file),
                          "upstream": [signatures[f] for f in feeders[stage]]}, sort_keys=True, default=str)
        signatures[stage] = hashlib.sha256(raw.encode()).hexdigest()[:16]
    return signatures


def stage_lock(stage: str, signature: str):
    """The file lock of a stage's signature under EDGETUNE_STAGE_LOCKS; no lock without it."""
    folder = os.environ.get(STAGE_LOCKS_ENV)
    if not folder:
        return contextlib.nullcontext()
    from filelock import FileLock

    Path(folder).mkdir(parents=True, exist_ok=True)
    return FileLock(Path(folder) / f"{stage}-{signature}.lock")


def _is_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as e:
        return e.transient
    except Exception:
        return False
    return False


def _run_dvc(stage: str, force: bool) -> str:
    """Run one stage through DVC, echoing its output; return the output."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    # dvc.yaml's commands say `python`: make that this interpreter, venv activated or not.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    chunks = []
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        chunks.append(chunk)
    output = b"".join(chunks).decode(errors="replace")
    if proc.wait() != 0:
        raise StageFailed(stage, proc.returncode, "\n".join(output.splitlines()[-25:]))
    return output


def build_flow():
    from prefect import flow, get_run_logger, task
    from prefect.states import Completed

    @task(retries=1, retry_delay_seconds=3, retry_condition_fn=_is_transient,
          task_run_name="{stage}")
    def run_stage(stage: str, force: bool = False, signature: str = ""):
        with stage_lock(stage, signature):  # another pipeline running it: wait, then take its outputs
            output = _run_dvc(stage, force)
        if "didn't change, skipping" in output or "is cached - skipping run" in output:
            get_run_logger().info("%s: unchanged, taken from the DVC cache", stage)
            return Completed(name="Cached", message=f"{stage} unchanged")
        return None

    @flow(name="edgetune-pipeline")
    def pipeline(force: bool = False) -> dict:
        params = load_params()
        logger = get_run_logger()
        mlflow = tracking.configure(params.tracking.experiment)
        outcomes: dict[str, str] = {}
        with mlflow.start_run(run_name=tracking.parent_run_name(params), tags={
            **tracking.pipeline_tags(params), **json.loads(os.environ.get(EXTRA_TAGS_ENV) or "{}"),
        }) as parent:
            mlflow.log_params(flatten(params))
            os.environ[tracking.PARENT_ENV] = parent.info.run_id
            signatures = stage_signatures(params)
            try:
                for stage in dag_order():
                    state = run_stage(stage, force, signatures[stage], return_state=True)
                    state.result()  # re-raises the stage's error: the flow fails here
                    outcomes[stage] = "cached" if state.name == "Cached" else "ran"
                    if outcomes[stage] == "cached":
                        tracking.log_cached_stage(
                            stage, params.tracking.experiment, parent.info.run_id,
                            section_params(params, stage),
                            Path("metrics") / f"{stage}.json")
            finally:
                os.environ.pop(tracking.PARENT_ENV, None)
            mlflow.log_metrics(tracking.headline_metrics(Path("metrics")))
            tracking.log_pipeline_datasets(mlflow.MlflowClient(), parent.info.run_id, params.data.task)
            mlflow.set_tag("edgetune.cached_stages",
                           ",".join(s for s, o in outcomes.items() if o == "cached") or "none")
        logger.info("stages: %s", ", ".join(f"{s}={o}" for s, o in outcomes.items()))
        return {"stages": outcomes, "run_id": parent.info.run_id,
                "experiment_id": parent.info.experiment_id}

    return pipeline


def section_params(params, stage: str, dvc_file: str = "dvc.yaml") -> dict[str, object]:
    """The params a stage reads, as dvc.yaml declares them (e.g. finetune + data.task)."""
    declared = yaml.safe_load(Path(dvc_file).read_text())["stages"][stage].get("params") or []
    keys = tuple(p for p in declared if isinstance(p, str))
    return {k: v for k, v in flatten(params).items() if k in keys or k.startswith(tuple(p + "." for p in keys))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the edgetune pipeline (DVC stages) as a Prefect flow.")
    p.add_argument("--force", action="store_true", help="re-run every stage, cached or not")
    args = p.parse_args(argv)
    load_params()  # bad params: exit 2 before Prefect, DVC or MLflow start
    pipeline = build_flow()
    state = pipeline(force=args.force, return_state=True)
    if state.is_failed():
        print(f"pipeline failed: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    print("pipeline done: " + ", ".join(f"{s} {o}" for s, o in result["stages"].items()))
    print(summary(Path("metrics"), result["run_id"], result["experiment_id"]))
    return 0


def summary(folder: Path, run_id: str, experiment_id: str) -> str:
    """What a run produced, for the end of `make run`: zero-shot -> fine-tuned -> compressed
    (score, size, tokens/s), where the final model is, and how to open this run in MLflow."""
    path = folder / "evaluate.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    lines = ["", f"{'model':<12}{'score':>8}{'size MB':>10}{'tokens/s':>10}  folder"]
    folders = {"base": "models/base", "finetuned": "models/finetuned/merged", "compressed": "models/compressed"}
    for name, label in (("base", "zero-shot"), ("finetuned", "fine-tuned"), ("compressed", "compressed")):
        m = rows.get(name) or {}
        if m:
            lines.append(f"{label:<12}{m.get('score', float('nan')):>8.4f}{m.get('size_mb', float('nan')):>10.1f}"
                         f"{m.get('tokens_per_s', float('nan')):>10.1f}  {folders[name]}")
    if "gain_over_zero_shot" in rows:
        lines.append(f"gain over zero-shot: {100 * rows['gain_over_zero_shot']:+.1f} points")
    ui = "http://127.0.0.1:5000"
    lines += [f"final model (Hugging Face folder): {folders['compressed']}",
              f"MLflow: make mlflow-ui, then open {tracking.experiment_url(ui, experiment_id, run_id)}",
              f"compare runs: {tracking.compare_view_url(ui, experiment_id)}"]
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(lambda argv: sys.exit(main(argv)))
