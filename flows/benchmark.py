"""A grid of pipeline runs — methods x tasks x partitions x compression recipes — as one
Prefect flow, all into one MLflow experiment, then the survey's Tables I and II, Fig. 3-style
loss curves and a score-vs-bytes plot, logged as MLflow artifacts.

    python -m flows.benchmark benchmarks/grids/small.yaml              # this CPU
    python -m flows.benchmark benchmarks/grids/paper.yaml --concurrency 2   # GPU, paper scale

Every cell is the ordinary pipeline (flows/pipeline.py over the DVC stages) in its own
workspace under <out>/cells/<label>-<task>, with params.yaml = the repo's + the grid's `base`
+ the task's overrides + the cell's `set`. All cells' params are validated before the first one
starts. Cells run as Prefect tasks, `--concurrency` at a time (then with OMP_WAIT_POLICY=PASSIVE
unless set: OpenMP threads spinning while idle slow cells that share cores ~2x); a failed cell is
reported in <out>/cells.md with its error, never dropped, and makes the flow exit 1 once the
tables of the others are written.

The cells share one DVC cache (<out>/dvc-cache), so a stage two cells run alike (same params,
same upstream: the base model, the prepared data and partitions, the calibration set, the
zero-shot scores) runs once; the other cells take it from DVC's run-cache and log it as a
cached stage. Cells running at once wait for each other on such a stage (flows/pipeline.py:
stage locks). Without --keep-models, a finished cell's own outputs (fine-tuned and compressed
models) leave the shared cache, and what cells share stays there for the next run of the grid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from edgetune.cli import run_main
from edgetune.config import BadInput, parse_params

REPO = Path(__file__).resolve().parents[1]
CODE = ("edgetune", "stages", "flows")


class Cell(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    set: dict[str, object] = {}  # dotted params keys -> values, e.g. finetune.method: job


class Grid(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    experiment: str
    tasks: list[str] = Field(min_length=1)
    base: dict[str, object] = {}  # dotted keys applied to every cell
    task_overrides: dict[str, dict[str, object]] = {}  # task -> dotted keys
    cells: list[Cell] = Field(min_length=1)
    concurrency: int = Field(1, ge=1)


def set_dotted(params: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def cell_params(grid: Grid, cell: Cell, task: str) -> dict:
    """The repo's params.yaml with the grid's, the task's and the cell's overrides."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {**grid.base, "data.task": task, **grid.task_overrides.get(task, {}),
                       **cell.set, "tracking.experiment": grid.experiment}.items():
        set_dotted(params, key, value)
    return params


def load_grid(path: Path) -> tuple[Grid, dict[str, dict]]:
    """The grid and every cell's params (`<label>-<task>` -> params), all validated."""
    if not path.is_file():
        raise BadInput(f"{path}: grid file not found")
    try:
        grid = Grid.model_validate(yaml.safe_load(path.read_text()))
    except Exception as e:  # pydantic / YAML: one line naming the file
        raise BadInput(f"{path}: not a valid grid ({str(e).splitlines()[0]}: {str(e).splitlines()[-1].strip()})") from None
    cells = {}
    for cell in grid.cells:
        for task in grid.tasks:
            params = cell_params(grid, cell, task)
            parse_params(params, f"{path} cell {cell.label} task {task}")  # BadInput names the key
            cells[f"{cell.label}-{task}"] = params
    return grid, cells


def make_workspace(folder: Path, params: dict, cache: Path) -> None:
    """A copy of the pipeline code with the cell's params.yaml and its own DVC repo, whose
    cache is the grid's shared one."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CODE:
        shutil.copytree(REPO / name, folder / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", folder)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (folder / ".dvc").is_dir():
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=folder, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "cache", "dir", str(cache)], cwd=folder, check=True)


def shared_stages(cells: dict[str, dict]) -> dict[str, list[str]]:
    """Cell -> its stages that some other cell runs with the same signature (the same params
    and upstream), which the grid computes once."""
    from collections import Counter

    from edgetune.config import parse_params
    from flows.pipeline import stage_signatures

    signatures = {label: stage_signatures(parse_params(params, label), str(REPO / "dvc.yaml"))
                  for label, params in cells.items()}
    counts = Counter(pair for sigs in signatures.values() for pair in sigs.items())
    return {label: [stage for stage, sig in sigs.items() if counts[stage, sig] > 1]
            for label, sigs in signatures.items()}


def cache_objects(lock_file: Path, stages, cache: Path) -> set[Path]:
    """The files of a DVC cache that the outputs of `stages` in a dvc.lock point to (for a
    folder: its manifest and every file it lists)."""
    def path(md5: str) -> Path:
        return cache / "files" / "md5" / md5[:2] / md5[2:]

    if not lock_file.is_file():
        return set()
    locked = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    found = set()
    for stage in stages:
        for md5 in (out.get("md5") for out in locked.get(stage, {}).get("outs", [])):
            if not md5:
                continue
            found.add(path(md5))
            if md5.endswith(".dir") and path(md5).is_file():
                found |= {path(entry["md5"]) for entry in json.loads(path(md5).read_text())}
    return found


def prune_cell(folder: Path, cache: Path, shared: dict[str, list[str]]) -> None:
    """Drop a finished cell's own outputs from the shared cache (its fine-tuned and compressed
    models), keeping every object a shared stage of any cell points to. A run-cache entry left
    pointing at a dropped object is not restored: DVC runs that stage again."""
    from flows.pipeline import dag_order

    label = folder.name
    keep = set().union(*(cache_objects(folder.parent / other / "dvc.lock", stages, cache)
                         for other, stages in shared.items()))
    own = set(dag_order(str(REPO / "dvc.yaml"))) - set(shared.get(label, []))
    for path in cache_objects(folder / "dvc.lock", own, cache) - keep:
        path.unlink(missing_ok=True)


def run_cell(folder: Path, tags: dict[str, str], tracking_uri: str, keep_models: bool, prefect_api: str,
             cache: Path, shared: dict[str, list[str]]) -> dict:
    """Run the pipeline flow in the cell's workspace, on the grid's Prefect server (its flow run
    beside the grid's; no temporary server per cell); returns status, seconds, error tail."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "EDGETUNE_RUN_TAGS": json.dumps(tags),
           "EDGETUNE_RUN_NAME": folder.name, "PREFECT_API_URL": prefect_api,
           "EDGETUNE_STAGE_LOCKS": str(cache.with_name("stage-locks")),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    with open(folder / "pipeline.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=folder, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if not keep_models:  # the runs keep the numbers; the model folders are GBs per cell
        shutil.rmtree(folder / "models", ignore_errors=True)
        prune_cell(folder, cache, shared)
    if proc.returncode:
        return {"status": "FAILED", "seconds": seconds, "error": first_error(folder / "pipeline.log")}
    return {"status": "FINISHED", "seconds": seconds, "error": ""}


def first_error(log: Path) -> str:
    """The stage's own `error:` line if there is one, else the log's last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[0 if errors else -1]


def write_report(grid: Grid, out: Path, tracking_uri: str, outcomes: dict[str, dict]) -> list[Path]:
    """Tables I and II (Markdown + CSV), the cell list, and the two plots; returns the files."""
    from edgetune import report

    runs = report.pipeline_runs(grid.experiment, grid.name, tracking_uri)
    files = []
    for name, table in (("table1", report.table_one(runs)), ("table2", report.table_two(runs))):
        table.to_csv(out / f"{name}.csv")
        (out / f"{name}.md").write_text(report.to_markdown(table))
        files += [out / f"{name}.csv", out / f"{name}.md"]
    cells = "| cell | status | minutes | error |\n|---|---|---|---|\n" + "".join(
        f"| {c} | {o['status']} | {o['seconds'] / 60:.1f} | {o['error'][:300]} |\n" for c, o in outcomes.items())
    (out / "cells.md").write_text(cells)
    report.plot_loss_curves(report.loss_curves(runs), out / "loss_curves.png")
    report.plot_score_vs_bytes(runs, out / "score_vs_bytes.png")
    return files + [out / "cells.md", out / "loss_curves.png", out / "score_vs_bytes.png"]


def build_flow(concurrency: int):
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    @task(task_run_name="{label}")
    def cell_task(label: str, folder: Path, tags: dict, tracking_uri: str, keep_models: bool,
                  prefect_api: str, cache: Path, shared: dict) -> dict:
        return run_cell(folder, tags, tracking_uri, keep_models, prefect_api, cache, shared)

    @flow(name="edgetune-benchmark", task_runner=ThreadPoolTaskRunner(max_workers=concurrency))
    def benchmark(grid_file: Path, out: Path, keep_models: bool) -> dict:
        from prefect.client.orchestration import get_client

        from edgetune import tracking

        grid, cells = load_grid(grid_file)
        out.mkdir(parents=True, exist_ok=True)
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        mlflow = tracking.configure(grid.experiment)  # create the store once, before cells race to
        if concurrency > 1:  # cells share the cores: idle OpenMP threads sleep, not spin on the others'
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # (two 2-thread runs on 2 cores: 63 -> 28 s)
        with get_client(sync_client=True) as client:  # PREFECT_API_URL's server, or this flow's temporary one
            prefect_api = str(client.api_url).rstrip("/")
        futures, cache, shared = {}, out / "dvc-cache", shared_stages(cells)
        for label, params in cells.items():
            folder = out / "cells" / label
            make_workspace(folder, params, cache)
            tags = {"edgetune.grid": grid.name, "edgetune.cell": label.rsplit("-", 1)[0]}
            futures[label] = cell_task.submit(label, folder, tags, tracking_uri, keep_models, prefect_api,
                                              cache, shared)
        outcomes = {label: f.result() for label, f in futures.items()}
        files = write_report(grid, out, tracking_uri, outcomes)
        with mlflow.start_run(run_name=f"grid {grid.name}",
                              tags={"edgetune.stage": "grid", "edgetune.grid": grid.name}):
            mlflow.log_params({"grid": grid.name, "cells": len(cells), "tasks": ",".join(grid.tasks)})
            mlflow.log_metrics({"cells_failed": sum(o["status"] != "FINISHED" for o in outcomes.values()),
                                "minutes": sum(o["seconds"] for o in outcomes.values()) / 60})
            for f in files:
                mlflow.log_artifact(str(f))
        return outcomes

    return benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a grid of edgetune pipelines and compare them.")
    p.add_argument("grid", type=Path, help="grid YAML (see benchmarks/grids/)")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/grid_<name>)")
    p.add_argument("--concurrency", type=int, help="cells at a time (default: the grid's)")
    p.add_argument("--keep-models", action="store_true", help="keep each cell's model folders")
    args = p.parse_args(argv)
    grid, _ = load_grid(args.grid)  # bad grid: exit 2 before Prefect starts
    out = (args.out or REPO / "benchmarks" / "results" / f"grid_{grid.name}").resolve()
    outcomes = build_flow(args.concurrency or grid.concurrency)(args.grid.resolve(), out, args.keep_models)
    failed = [c for c, o in outcomes.items() if o["status"] != "FINISHED"]
    print(f"grid {grid.name}: {len(outcomes) - len(failed)} cells finished, {len(failed)} failed; "
          f"tables and plots in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(lambda argv: sys.exit(main(argv)))
