"""DVC runs queued experiments in temporary copies of the project; their MLflow runs must still
land in the project's own store: one parent run per experiment, named after it, holding its
stage runs, none left RUNNING (issue: `dvc exp run --queue` lost every run). As a user does,
the stages that finetune.* does not reach ran once before queueing: the experiments restore
them from DVC's run-cache and run fine-tuning onwards, two at a time."""

from __future__ import annotations

import sys
import time

from tests.pipeline_project import make_project, mlflow_runs, run

TINY = {
    "data": {"max_train": 200, "max_eval": 16},
    "partition": {"num_clients": 4, "min_size": 10},
    "finetune": {"num_rounds": 1, "local_steps": 1, "batch_size": 4},
    "compress": {"calibration": {"samples": 4, "seq_len": 32}},
    "evaluate": {"ppl_windows": 1, "ppl_seq_len": 32, "latency_new_tokens": 2},
    "tracking": {"experiment": "queued"},
}


def wait_for_queue(root, env, timeout_s: float = 1500) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, status = run([sys.executable, "-m", "dvc", "queue", "status"], root, env)
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(10)
    raise AssertionError(f"queue still busy after {timeout_s} s:\n{status}")


def test_two_queued_experiments_log_every_run_to_the_project_store(tmp_path, tiny_model_dir):
    root = tmp_path / "project"
    root.mkdir()
    env = make_project(root, {**TINY, "model": {"source": str(tiny_model_dir)}}, git=True)
    dvc = [sys.executable, "-m", "dvc"]
    rc, out = run([*dvc, "repro", "partition", "calibrate", "zeroshot"], root, env)
    assert rc == 0, out
    try:
        for name, lr in (("exp-a", "0.002"), ("exp-b", "0.003")):
            rc, out = run([*dvc, "exp", "run", "--queue", "-n", name, "-S", f"finetune.lr={lr}"], root, env)
            assert rc == 0, out
        rc, out = run([*dvc, "queue", "start", "-j", "2"], root, env)
        assert rc == 0, out
        status = wait_for_queue(root, env)
    finally:
        run([*dvc, "queue", "stop", "--kill"], root, env)
    assert status.count("Success") == 2, status
    _, logs = run([*dvc, "queue", "logs", "exp-a"], root, env)
    assert "database is locked" not in logs
    assert "Running stage 'finetune'" in logs and "Running stage 'zeroshot'" not in logs, logs[-3000:]

    client, runs = mlflow_runs(root, "queued")
    assert client.get_experiment_by_name("queued").artifact_location == (root / "mlruns").as_uri()
    parents = {r.data.tags.get("edgetune.dvc_exp"): r for r in runs if r.data.tags.get("edgetune.stage") == "pipeline"}
    assert set(parents) == {"exp-a", "exp-b"}
    for name, parent in parents.items():
        assert parent.info.run_name == name and parent.info.status == "FINISHED"
        stages = [r.data.tags["edgetune.stage"] for r in runs
                  if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert {"finetune", "compress", "evaluate"} <= set(stages) and len(stages) == len(set(stages))
        assert "score_finetuned" in parent.data.metrics
        assert parent.data.params["finetune.lr"] == {"exp-a": "0.002", "exp-b": "0.003"}[name]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for r in runs:  # what the store holds (pytest -s shows it)
        print(r.info.run_name, r.info.status, r.data.tags.get("edgetune.stage"), r.data.tags.get("edgetune.dvc_exp"))
