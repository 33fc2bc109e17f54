"""MLflow: one parent run per pipeline execution, one child run per stage.

The Prefect flow opens the parent run and hands its id to the stages through the environment
variable EDGETUNE_PARENT_RUN_ID (DVC passes the environment through to each stage's command).
Under `dvc exp run` (workspace, --queue or --temp) the first stage that runs opens a parent
run named after the DVC experiment (DVC_EXP_NAME) and later stages join it. A stage run by
plain `dvc repro` logs a top-level run.

Parent runs are named by what distinguishes them (the DVC experiment, else method / trainable /
task and the knobs that differ from the defaults, each also a `knob.<key>` tag). The datasets
(prepared splits, partitions) are logged as dataset inputs and every model the pipeline makes
as an MLflow logged model that points at its DVC-tracked folder (log_model).

Default store: sqlite mlflow.db at the project root (DVC_ROOT, which DVC sets to the project
even inside the temporary copies where queued experiments run; else the working folder);
MLFLOW_TRACKING_URI wins.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

from edgetune.config import BadInput, Params, flatten

# Logging a dataset: MLflow's advice on integer columns is for model signatures, and a local
# Parquet path matches two equivalent source kinds; neither says anything to edgetune's users.
warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")


PARENT_ENV = "EDGETUNE_PARENT_RUN_ID"
DVC_EXP_ENV = "DVC_EXP_NAME"  # set by DVC for the stages of `dvc exp run`
RUN_NAME_ENV = "EDGETUNE_RUN_NAME"  # a parent run name chosen by the caller (flows/benchmark.py)
NAME_ORDER = ["finetune", "compress", "export", "partition", "data", "audit", "evaluate", "model", "tracking"]
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # the UI opens on runs
VIEW_TAG = "mlflow.sharedViewState.edgetune-compare"  # compare_view_state()
DATASETS = {  # what the pipeline's parent run logs as dataset inputs: name -> (path, context)
    "train": ("data/prepared/train.parquet", "training"),
    "eval": ("data/prepared/eval.parquet", "evaluation"),
    "partitions": ("data/partitions", "training"),
}


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).absolute()


def store_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def configure(experiment: str):
    """Point MLflow at the store and experiment (created as a model-development experiment, so
    the UI opens on its runs); returns the mlflow module. A store that cannot be used is bad
    input (BadInput naming the URI), reported before any work."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = store_uri()
    default_store = not os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri sets it
    origin = "tracking store" if default_store else "MLFLOW_TRACKING_URI"
    check_reachable(uri, origin)
    mlflow.set_tracking_uri(uri)
    try:
        with creation_lock(uri):
            if default_store and mlflow.get_experiment_by_name(experiment) is None:
                # artifacts beside the store, not in the working folder (a queued DVC experiment's
                # is a temporary copy of the project)
                mlflow.MlflowClient().create_experiment(
                    experiment, artifact_location=(project_root() / "mlruns").as_uri())
            exp = mlflow.set_experiment(experiment)
            if KIND_TAG not in exp.tags or VIEW_TAG not in exp.tags:
                client = mlflow.MlflowClient()
                client.set_experiment_tag(exp.experiment_id, KIND_TAG, exp.tags.get(KIND_TAG, KIND))
                client.set_experiment_tag(exp.experiment_id, VIEW_TAG, compare_view_state())
    except mlflow.MlflowException as e:  # e.g. an unknown URI scheme, a deleted experiment
        raise BadInput(f"{origin} {uri!r}: {e.message}") from None
    return mlflow


def creation_lock(uri: str):
    """Serialize the first use of a SQLite store: two stages of parallel DVC experiments that
    create the database (schema migrations) or the experiment at once would collide."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()

    @contextmanager
    def locked():
        path = Path(uri.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    return locked()


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


def changed_knobs(params: Params) -> dict[str, object]:
    """The knobs whose values differ from the defaults (= the committed params.yaml)."""
    defaults = flatten(Params())
    return {k: v for k, v in flatten(params).items() if defaults.get(k, object()) != v}


def parent_run_name(params: Params) -> str:
    """What tells this pipeline run apart: the DVC experiment's name (or EDGETUNE_RUN_NAME, e.g. a
    grid cell's label), else e.g. 'fedkseed/lora sst2 lr=0.002 num_rounds=3' (method / trainable,
    task, up to two changed knobs, fine-tuning's first)."""
    name = os.environ.get(DVC_EXP_ENV) or os.environ.get(RUN_NAME_ENV)
    if name:
        return name
    ft = params.finetune
    shown = {"finetune.method", "finetune.trainable", "data.task", "tracking.experiment", "model.source"}
    changed = sorted(changed_knobs(params).items(), key=lambda kv: name_rank(kv[0]))
    extra = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in changed if k not in shown]
    return " ".join([f"{ft.method}/{ft.trainable_set}", params.data.task, *extra[:2]]
                    + ([f"+{len(extra) - 2}"] if len(extra) > 2 else []))


def name_rank(knob: str) -> int:
    """Where a changed knob goes in a run name: by its block's place in NAME_ORDER (a block
    not listed goes last)."""
    block = knob.split(".")[0]
    return NAME_ORDER.index(block) if block in NAME_ORDER else len(NAME_ORDER)


def pipeline_tags(params: Params) -> dict[str, str]:
    """Tags of a pipeline's parent run: method, task, compression chain, DVC experiment and
    one `knob.<key>` tag per knob changed from the defaults (a column in the runs table)."""
    changed = changed_knobs(params)
    tags = {"edgetune.stage": "pipeline", "mlflow.source.git.commit": git_commit(),
            "edgetune.method": params.finetune.method, "edgetune.task": params.data.task,
            "edgetune.trainable": params.finetune.trainable_set,
            "edgetune.compress": " -> ".join(s.method for s in params.compress.steps) or "none",
            "edgetune.changed": ", ".join(f"{k}={v}" for k, v in changed.items()) or "none",
            **{f"knob.{k}": str(v) for k, v in changed.items()}}
    if os.environ.get(DVC_EXP_ENV):
        tags["edgetune.dvc_exp"] = os.environ[DVC_EXP_ENV]
    return tags


def dvc_experiment_parent(mlflow, params: Params) -> str | None:
    """Under `dvc exp run`: the parent run of this DVC experiment (found by its tag, or
    created with all params by the experiment's first stage); None outside DVC experiments."""
    name = os.environ.get(DVC_EXP_ENV)
    if not name:
        return None
    client = mlflow.MlflowClient()
    exp_id = mlflow.get_experiment_by_name(params.tracking.experiment).experiment_id
    found = client.search_runs([exp_id], f"tags.`edgetune.dvc_exp` = '{name}' and tags.`edgetune.stage` = 'pipeline'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=parent_run_name(params), tags=pipeline_tags(params))
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flatten(params).items()])
    client.set_terminated(run.info.run_id)  # never left RUNNING; each stage updates it
    return run.info.run_id


def finish_dvc_parent(mlflow, parent_id: str, task: str, failed: bool) -> None:
    """After a stage of a DVC experiment: the parent gets the headline metrics and datasets
    so far, and ends FAILED if this stage failed."""
    client = mlflow.MlflowClient()
    log_pipeline_datasets(client, parent_id, task)
    metrics = headline_metrics(Path("metrics"))
    if metrics:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(parent_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")


@contextmanager
def stage_run(stage: str, params: Params, logged: dict[str, object]):
    """A child run of the pipeline's parent run (the flow's, or the DVC experiment's), or a
    top-level run under plain `dvc repro`; FAILED if the body raises."""
    mlflow = configure(params.tracking.experiment)
    dvc_parent = None if os.environ.get(PARENT_ENV) else dvc_experiment_parent(mlflow, params)
    parent = os.environ.get(PARENT_ENV) or dvc_parent
    failed = True
    try:
        with mlflow.start_run(run_name=stage, parent_run_id=parent,
                              tags=base_tags(stage, cached=False)) as run:
            mlflow.log_params(logged)
            yield run
            failed = False
    finally:
        if dvc_parent:
            finish_dvc_parent(mlflow, dvc_parent, params.data.task, failed)


def dataset(path: str | Path, name: str):
    """An MLflow dataset for a Parquet file or a folder of them (one `client` column added):
    schema, row count and digest of the data, the path as its source; the rows stay in DVC."""
    import mlflow
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        frame = pd.concat([pd.read_parquet(f).assign(client=f.stem) for f in files], ignore_index=True)
    else:
        frame = pd.read_parquet(path)
    return mlflow.data.from_pandas(frame, source=str(path), name=name,
                                   targets="label" if "label" in frame.columns else None)


def has_rows(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.glob("*.parquet")))


def log_datasets(client, run_id: str, datasets: dict[str, tuple[str, str]], task: str) -> None:
    """Log {name: (path, context)} as dataset inputs of a run (existing paths only; MLflow keeps
    one input per dataset and run, so logging again is harmless)."""
    from mlflow.entities import DatasetInput, InputTag

    inputs = [DatasetInput(dataset(path, f"{task}-{name}")._to_mlflow_entity(),
                           [InputTag("mlflow.data.context", context)])
              for name, (path, context) in datasets.items() if has_rows(Path(path))]
    if inputs:
        client.log_inputs(run_id, inputs)


def log_pipeline_datasets(client, run_id: str, task: str) -> None:
    log_datasets(client, run_id, DATASETS, task)


PIPELINE_RUNS = "tags.`edgetune.stage` = 'pipeline'"
COMPARE_CHARTS = (("bytes_per_client_round", "score_finetuned"), ("peak_rss_mb_finetune", "score_finetuned"))
COMPARE_VIEW = "edgetune-compare"  # the key of the shared view below


def compare_view_state() -> str:
    """The MLflow UI's own saved-view state (what its Share button stores as the experiment tag
    mlflow.sharedViewState.<key>): the pipeline runs, in the chart view, with scatter charts of
    the fine-tuned score against bytes per client per round and peak fine-tuning memory."""
    section = {"uuid": "edgetune", "name": "Score vs cost", "display": True, "isReordered": False,
               "deleted": False, "isGenerated": False}
    charts = [{"uuid": f"edgetune-{x}", "type": "SCATTER", "runsCountToCompare": 100,
               "metricSectionId": "edgetune", "deleted": False, "isGenerated": False,
               "xaxis": {"key": x, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"},
               "displayName": f"{y} vs {x}"} for x, y in COMPARE_CHARTS]
    return json.dumps({"searchFilter": PIPELINE_RUNS, "orderByKey": "attributes.start_time",
                       "orderByAsc": False, "startTime": "ALL", "lifecycleFilter": "Active",
                       "datasetsFilter": [], "modelVersionFilter": "All Runs",
                       "compareRunCharts": charts, "compareRunSections": [section],
                       "runsExpanded": {}, "runsPinned": [], "runsHidden": [], "viewMaximized": False,
                       "runListHidden": False, "isAccordionReordered": False, "hideEmptyCharts": True})


def compare_view_url(base: str, experiment_id: str) -> str:
    """A link to the compare view (compare_view_state, stored on the experiment by configure)."""
    query = urllib.parse.urlencode({"viewStateShareKey": COMPARE_VIEW, "compareRunsMode": "CHART",
                                    "workflowType": "machine_learning"})
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def experiment_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link that opens the experiment (or one run) on the model-training side of the UI."""
    return f"{base}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + \
        "?workflowType=machine_learning"


MODEL_SECTIONS = {  # the params that made a model of each role, logged with it
    "zero-shot": ("model.", "data.", "evaluate."),
    "fine-tuned": ("model.", "data.", "partition.", "finetune.", "evaluate."),
    "compressed": ("model.", "data.", "partition.", "finetune.", "compress.", "evaluate."),
    "exported": ("model.", "data.", "partition.", "finetune.", "compress.", "export.", "evaluate."),
}


def log_model(role: str, folder: str, metrics: dict, params: Params, eval_data: str) -> str:
    """Log a model the pipeline made (role: zero-shot, fine-tuned or compressed) as an MLflow
    logged model: no weights copied, its `edgetune.folder` tag names the DVC-tracked folder;
    its source run is the pipeline's parent run (so the runs table's Models column lists it);
    its params are the knobs that made it and its metrics (linked to the eval dataset) are
    logged by a nested run "<role> model" of the current stage run, under their plain names
    (accuracy, size_mb, ...) so the Models view compares models across runs. The stage run and
    the parent run also list it as an output."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    run = mlflow.active_run()
    tags = {"edgetune.folder": folder, "edgetune.role": role, "mlflow.source.git.commit": git_commit()}
    if os.environ.get(DVC_EXP_ENV):
        tags["edgetune.dvc_exp"] = os.environ[DVC_EXP_ENV]
    sections = MODEL_SECTIONS.get(role.split(" ")[0], MODEL_SECTIONS["compressed"])
    knobs = {k: str(v)[:6000] for k, v in flatten(params).items() if k.startswith(sections)}
    pipeline_run = run.data.tags.get("mlflow.parentRunId") or run.info.run_id  # the UI's Models column
    model = mlflow.create_external_model(name=re.sub(r"[- ]", "_", role), source_run_id=pipeline_run,
                                         params=knobs, tags=tags, model_type="causal-lm")
    eval_set = dataset(eval_data, f"{params.data.task}-eval")
    with mlflow.start_run(run_name=f"{role} model", nested=True, tags={"edgetune.model": role}):
        mlflow.log_metrics(numeric(metrics), model_id=model.model_id, dataset=eval_set)
    mlflow.finalize_logged_model(model.model_id, "READY")
    client = mlflow.MlflowClient()
    for run_id in filter(None, [run.info.run_id, run.data.tags.get("mlflow.parentRunId")]):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    return model.model_id


def headline_metrics(folder: Path) -> dict[str, float]:
    """Every stage's numeric metrics as '<stage>.<key>', plus short names to sort by in the UI."""
    metrics: dict[str, float] = {}
    for f in sorted(folder.glob("*.json")):
        metrics.update(numeric(json.loads(f.read_text()), f.stem + "."))
    aliases = {
        "accuracy_zero_shot": "evaluate.base.accuracy",
        "accuracy_finetuned": "evaluate.finetuned.accuracy",
        "accuracy_compressed": "evaluate.compressed.accuracy",
        "score_zero_shot": "evaluate.base.score",
        "score_finetuned": "evaluate.finetuned.score",
        "score_compressed": "evaluate.compressed.score",
        "macro_f1_zero_shot": "evaluate.base.macro_f1",
        "macro_f1_finetuned": "evaluate.finetuned.macro_f1",
        "macro_f1_compressed": "evaluate.compressed.macro_f1",
        "peak_rss_mb_finetune": "finetune.peak_rss_mb",
        "bytes_per_client_round": "finetune.bytes_per_client_round",  # up + down, last round
        "size_mb_compressed": "evaluate.compressed.size_mb",
        "perplexity_compressed": "evaluate.compressed.perplexity",
        "tokens_per_s_compressed": "evaluate.compressed.tokens_per_s",
        "peak_rss_mb_finetuned": "evaluate.finetuned.peak_rss_mb",
    }
    metrics.update({a: metrics[k] for a, k in aliases.items() if k in metrics})
    metrics.update(export_aliases(folder, metrics))
    return metrics


def export_aliases(folder: Path, metrics: dict[str, float]) -> dict[str, float]:
    """score_gguf-q4_0, tokens_per_s_gguf-q4_0, ...: each exported file's headline numbers."""
    path = folder / "export.json"
    formats = json.loads(path.read_text()).get("formats", []) if path.is_file() else []
    return {f"{key}_{fmt}": metrics[f"evaluate.{fmt}.{key}"] for fmt in formats
            for key in ("score", "size_mb", "tokens_per_s", "perplexity") if f"evaluate.{fmt}.{key}" in metrics}


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
