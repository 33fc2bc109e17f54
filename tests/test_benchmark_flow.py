"""flows/benchmark.py: a grid of real pipeline runs (tiny model, few rows) into one MLflow
experiment, Tables I/II and plots from those runs, and a failing cell reported, not dropped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.e2e

TINY = {
    "data.max_train": 200, "data.max_eval": 16, "partition.num_clients": 2, "partition.min_size": 5,
    "finetune.num_rounds": 2, "finetune.local_steps": 1, "finetune.batch_size": 4,
    "compress.steps": [], "compress.evaluate_steps": False,
    "compress.calibration.samples": 2, "compress.calibration.seq_len": 32,
    "evaluate.ppl_windows": 1, "evaluate.ppl_seq_len": 64, "evaluate.latency_new_tokens": 2,
}


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, tiny_model_dir, mirror):
    root = tmp_path_factory.mktemp("grid")
    grid = {"name": "tiny", "experiment": "grid-tiny", "tasks": ["sst2"],
            "base": {**TINY, "model.source": str(tiny_model_dir)},
            "cells": [{"label": "fedit", "set": {"finetune.method": "fedit"}},
                      {"label": "job", "set": {"finetune.method": "job", "finetune.trainable": "lora"}},
                      {"label": "broken", "set": {"model.source": str(root / "no_such_model")}}],
            "concurrency": 3}
    (root / "grid.yaml").write_text(yaml.safe_dump(grid))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "PREFECT_API"))}
    env.update(EDGETUNE_DATA_MIRROR=str(mirror), PREFECT_HOME=str(root / ".prefect"))
    proc = subprocess.run([sys.executable, "-m", "flows.benchmark", str(root / "grid.yaml"), "--out",
                           str(root / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return root / "out", proc


def test_a_failing_cell_is_reported_and_fails_the_flow(grid_run):
    out, proc = grid_run
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = (out / "cells.md").read_text()
    assert "| fedit-sst2 | FINISHED |" in cells and "| job-sst2 | FINISHED |" in cells
    assert "| broken-sst2 | FAILED |" in cells and "no_such_model" in cells


def test_tables_come_from_the_runs_of_this_grid(grid_run):
    import pandas as pd

    out, _ = grid_run
    table2 = pd.read_csv(out / "table2.csv", index_col=0)
    assert list(table2.index) == ["zero-shot", "fedit", "job"] and list(table2.columns) == ["sst2"]
    assert table2.notna().all().all() and ((0 <= table2) & (table2 <= 1)).all().all()
    table1 = pd.read_csv(out / "table1.csv", index_col=0).set_index("method")
    assert table1.loc["job", "bytes / client / round"] < table1.loc["fedit", "bytes / client / round"] / 10
    assert table1.loc["job", "exchanges"] == "seeds + scalars"
    for plot in ("loss_curves.png", "score_vs_bytes.png"):
        assert (out / plot).stat().st_size > 10_000


def test_every_run_is_in_one_experiment_and_none_is_left_running(grid_run):
    import mlflow

    out, _ = grid_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("grid-tiny")
    runs = client.search_runs([exp.experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    pipelines = [r for r in runs if r.data.tags.get("edgetune.stage") == "pipeline"]
    assert sorted(r.data.tags["edgetune.cell"] for r in pipelines) == ["broken", "fedit", "job"]
    grid = next(r for r in runs if r.data.tags.get("edgetune.stage") == "grid")
    assert grid.data.metrics["cells_failed"] == 1
    assert {"table1.md", "table2.md", "cells.md", "loss_curves.png"} <= {a.path for a in client.list_artifacts(grid.info.run_id)}


def test_stages_the_cells_share_run_once_and_their_own_models_leave_the_cache(grid_run):
    """fedit and job read the same model, data, partitions, calibration set and zero-shot
    scores: one cell runs each of those stages, the other takes it from the shared DVC cache
    (a cached child run); fine-tuning on runs in both. A finished cell's fine-tuned model leaves
    the shared cache, the base model stays for the next run of the grid."""
    import mlflow

    out, _ = grid_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("grid-tiny").experiment_id])
    parents = {r.data.tags["edgetune.cell"]: r.info.run_id for r in runs if r.data.tags.get("edgetune.stage") == "pipeline"}

    def cached(cell: str, stage: str) -> str:
        child, = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[cell]
                  and r.data.tags["edgetune.stage"] == stage]
        return child.data.tags["edgetune.cached"]

    for stage in ("model", "prepare", "partition", "calibrate", "zeroshot"):
        assert sorted(cached(cell, stage) for cell in ("fedit", "job")) == ["false", "true"], stage
    for stage in ("finetune", "compress", "evaluate"):
        assert [cached(cell, stage) for cell in ("fedit", "job")] == ["false", "false"], stage
    lock = yaml.safe_load((out / "cells" / "job-sst2" / "dvc.lock").read_text())["stages"]

    def in_cache(stage: str, path: str) -> bool:
        md5, = [o["md5"] for o in lock[stage]["outs"] if o["path"] == path]
        return (out / "dvc-cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file()

    assert in_cache("model", "models/base") and in_cache("partition", "data/partitions")
    assert not in_cache("finetune", "models/finetuned")


def test_a_bad_grid_fails_before_any_cell_starts(tmp_path):
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "name": "bad", "experiment": "x", "tasks": ["sst2"],
        "cells": [{"label": "a", "set": {"finetune.method": "fedsomething"}}]}))
    proc = subprocess.run([sys.executable, "-m", "flows.benchmark", str(tmp_path / "grid.yaml"), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "finetune.method" in proc.stderr
    assert "cell a task sst2" in proc.stderr and not (tmp_path / "out").exists()


def run_screenshot(out, *args):
    return subprocess.run([sys.executable, "-m", "benchmarks.mlflow_screenshot", "--tracking-uri",
                           f"sqlite:///{out / 'mlflow.db'}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(not shutil.which("chromium"), reason="Chromium not installed (.ci/run installs it)")
def test_the_mlflow_compare_view_of_the_grid_is_screenshotted(grid_run, tmp_path):
    out, _ = grid_run
    proc = run_screenshot(out, "--experiment", "grid-tiny", "--out", str(tmp_path / "compare.png"),
                          "--size", "1200x900", "--wait-ms", "15000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000  # a rendered page, not a blank one


def test_screenshot_of_an_unknown_experiment_fails_with_one_line(grid_run, tmp_path):
    out, _ = grid_run
    proc = run_screenshot(out, "--experiment", "no-such-experiment", "--browser", sys.executable,
                          "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    assert "no-such-experiment" in proc.stderr and not (tmp_path / "x.png").exists()
