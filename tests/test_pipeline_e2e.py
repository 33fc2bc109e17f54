"""End to end on the real packaged SmolLM2-135M and the packaged SST-2, as on a fresh machine
(no data mirror, the hub offline): the Prefect flow over the DVC stages, MLflow parent/child
runs, real metrics and models that reload. Wiring that needs no real model (cached re-runs,
switching to prefix tuning, a compression chain re-running compress only, a failing stage) is
tested on a tiny model in tests/test_pipeline_wiring.py.

One small project is built in a temp folder (a copy of the pipeline code with a params.yaml of
few rows and rounds) and the flow runs once; the tests below then inspect it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.pipeline_project import make_project, ran_stages, run
from tests.pipeline_project import mlflow_runs as project_runs

pytestmark = pytest.mark.e2e

SMALL = {
    "data": {"max_train": 400, "max_eval": 48},
    "partition": {"num_clients": 4, "alpha": 0.5, "min_size": 10},
    "finetune": {"num_rounds": 2, "local_steps": 2, "batch_size": 4},
    "compress": {"calibration": {"samples": 8, "seq_len": 64}, "evaluate_steps": False},  # evaluate measures the end
    "evaluate": {"ppl_windows": 2, "ppl_seq_len": 128, "latency_new_tokens": 4},
    "tracking": {"experiment": "e2e"},
}
STAGES = {"model", "prepare", "partition", "finetune", "calibrate", "compress", "export", "zeroshot", "evaluate"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    env = make_project(root, SMALL)
    rc, output = run([sys.executable, "-m", "flows.pipeline"], root, env)
    assert rc == 0, output[-4000:]
    return root, env, output


def mlflow_runs(root: Path):
    return project_runs(root, "e2e")


def test_flow_runs_every_stage_and_tracks_it_in_mlflow(project):
    root, _, output = project
    assert ran_stages(output) == STAGES
    client, runs = mlflow_runs(root)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["finetune.lr"] == "auto"
    assert parent.data.params["partition.alpha"] == "0.5"
    for key in ("accuracy_zero_shot", "accuracy_finetuned", "accuracy_compressed",
                "bytes_per_client_round", "size_mb_compressed", "peak_rss_mb_finetuned"):
        assert key in parent.data.metrics, key
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["edgetune.stage"] for r in children) == sorted(STAGES)
    assert all(r.data.tags["edgetune.cached"] == "false" for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    finetune = next(r for r in children if r.data.tags["edgetune.stage"] == "finetune")
    history = client.get_metric_history(finetune.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    up = client.get_metric_history(finetune.info.run_id, "bytes_up_per_client")
    assert all(m.value > 100_000 for m in up)  # real LoRA weights went up
    partition = next(r for r in children if r.data.tags["edgetune.stage"] == "partition")
    artifacts = {a.path for a in client.list_artifacts(partition.info.run_id)}
    assert {"stats.json", "partition_label_share.png"} <= artifacts
    prepare = next(r for r in children if r.data.tags["edgetune.stage"] == "prepare")
    assert prepare.data.tags["edgetune.data.source"] == "packaged"
    assert len(prepare.data.tags["edgetune.data.sha256.train.parquet"]) == 64
    assert "final model (Hugging Face folder): models/compressed" in output
    assert f"runs/{parent.info.run_id}" in output  # the MLflow address of this very run


def test_metrics_are_real_and_models_reload(project):
    root, env, _ = project
    ev = json.loads((root / "metrics" / "evaluate.json").read_text())
    for name in ("base", "finetuned", "compressed"):
        assert 0 <= ev[name]["accuracy"] <= 1 and ev[name]["eval_examples"] == 48
        assert 1 < ev[name]["perplexity"] < 1000
        assert ev[name]["peak_rss_mb"] > 300
    assert ev["compressed"]["size_mb"] < 0.5 * ev["finetuned"]["size_mb"]
    for name, row in ev.items():  # torch and exported rows alike say whether a model answers one label
        if isinstance(row, dict) and "accuracy" in row:
            assert 0 <= row["macro_f1"] <= 1, name
            assert row["predicted_share_negative"] + row["predicted_share_positive"] == pytest.approx(1), name
    code = ("import sys; from transformers import AutoModelForCausalLM as M; "
            "[M.from_pretrained(p) for p in sys.argv[1:]]; print('ok')")
    rc, out = run([sys.executable, "-c", code, "models/finetuned/merged", "models/compressed"], root, env)
    assert rc == 0 and "ok" in out, out[-2000:]


def test_compare_notebook_executes_against_the_runs(project):
    import nbformat
    from nbclient import NotebookClient

    root, _, _ = project
    nb = nbformat.read(REPO / "notebooks" / "compare_experiments.ipynb", as_version=4)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["EDGETUNE_EXPERIMENT"] = "e2e"
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
        os.environ.pop("EDGETUNE_EXPERIMENT")
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "finished pipeline runs in 'e2e'" in printed and not printed.startswith("0 ")
