"""Resume after kill -9: the real finetune stage (tiny Llama, real SST-2 rows) is killed right
after a round's resume checkpoint appears, twice, then re-run; it must end bit-identical to an
uninterrupted run, leave no RUNNING MLflow run, and never resume under other params."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from edgetune.federated.resume import ResumeFolder
from tests import helpers
from tests.conftest import REPO
from tests.helpers import make_clients

ROUNDS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir, sst2_prompts):
    import pandas as pd

    root = tmp_path_factory.mktemp("resume")
    parts = root / "partitions"
    parts.mkdir()
    for c in make_clients(sst2_prompts, n=4, size=16):
        pd.DataFrame({"prompt": c.prompts, "label": c.targets}).to_parquet(parts / f"client_{c.client_id}.parquet")
    return root, tiny_model_dir, parts


def write_params(folder, method, seed=0):
    raw = {"partition": {"num_clients": 4}, "tracking": {"experiment": "resume"},
           "finetune": {"method": method, "num_rounds": ROUNDS, "local_steps": 1, "batch_size": 4,
                        "sample_rate": 0.5, "seed": seed, "lr": 5e-3, "zo": {"K": 64, "lr": 1e-4},
                        "server": {"optimizer": "fedadam" if method == "fedit" else "auto"}}}
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))


def start(workspace, folder) -> subprocess.Popen:
    root, model, parts = workspace
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("EDGETUNE_PARENT_RUN_ID", None)
    return subprocess.Popen(
        [sys.executable, "-m", "stages.finetune", "--params", str(folder / "params.yaml"), "--model", str(model),
         "--partitions", str(parts), "--out", str(folder / "out"), "--plots", str(folder / "plots"),
         "--metrics", str(folder / "m.json")],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]


def kill_after_round(proc: subprocess.Popen, folder, round_: int, kill=None) -> None:
    """SIGKILL (or `kill(proc)`) as soon as the resume checkpoint of `round_` (or later) exists."""
    resume = folder / "out.resume"
    while proc.poll() is None:
        rounds = [int(p.stem.split("-")[1]) for p in resume.glob("round-*.pt")] if resume.is_dir() else []
        if rounds and max(rounds) >= round_:
            (kill or (lambda p: p.send_signal(signal.SIGKILL)))(proc)
            break
        time.sleep(0.005)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it could be killed"


def runs(workspace):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workspace[0] / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("resume").experiment_id])


@pytest.mark.parametrize("method", ["fedit"])  # fedkseed: killed and resumed on Flower (test_flower.py)
def test_killed_twice_then_resumed_is_bit_identical(workspace, method):
    ref, cut = workspace[0] / f"{method}-ref", workspace[0] / f"{method}-cut"
    for folder in (ref, cut):
        folder.mkdir()
        write_params(folder, method)
    finish(start(workspace, ref))
    kill_after_round(start(workspace, cut), cut, 1)  # between rounds 1 and 2 (or just after)
    second = start(workspace, cut)
    kill_after_round(second, cut, 3)  # right after a later round's checkpoint
    finish(start(workspace, cut))

    assert not (cut / "out.resume").exists()
    assert (cut / "out" / "checkpoint" / "global.safetensors").read_bytes() == \
        (ref / "out" / "checkpoint" / "global.safetensors").read_bytes()
    assert (cut / "out" / "merged" / "model.safetensors").read_bytes() == \
        (ref / "out" / "merged" / "model.safetensors").read_bytes()
    import mlflow
    import pandas as pd

    curves = [pd.read_csv(f / "plots" / "rounds.csv").drop(columns="seconds") for f in (ref, cut)]
    pd.testing.assert_frame_equal(*curves)

    mine = [r for r in runs(workspace) if r.data.params.get("finetune.method") == method]
    assert not [r for r in runs(workspace) if r.info.status == "RUNNING"]
    killed = sorted((r for r in mine if r.info.status == "KILLED"), key=lambda r: r.info.start_time)
    final = max(mine, key=lambda r: r.info.start_time)
    assert len(killed) == 2 and final.info.status == "FINISHED"
    assert killed[0].data.tags["edgetune.resumed_by"] == killed[1].info.run_id
    assert killed[1].data.tags["edgetune.resumed_by"] == final.info.run_id
    assert int(final.data.tags["edgetune.resumed_from_round"]) >= 3
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workspace[0] / 'mlflow.db'}")
    steps = sorted(m.step for m in client.get_metric_history(final.info.run_id, "train_loss"))
    assert steps == list(range(1, ROUNDS + 1))  # the whole curve, resumed rounds re-logged


def test_other_params_do_not_resume(workspace):
    folder = workspace[0] / "changed"
    folder.mkdir()
    write_params(folder, "fedit")
    kill_after_round(start(workspace, folder), folder, 1)
    killed = (folder / "out.resume" / "run_id").read_text()
    write_params(folder, "fedit", seed=1)
    finish(start(workspace, folder))
    final = max(runs(workspace), key=lambda r: r.info.start_time)
    assert "edgetune.resumed_from_round" not in final.data.tags
    assert {r.info.run_id: r.info.status for r in runs(workspace)}[killed] == "KILLED"
    assert not (folder / "out.resume").exists()


def test_a_changed_fingerprint_wipes_the_folder(tmp_path):
    resume = ResumeFolder(tmp_path / "r", "a")
    resume.record_run("run-a")
    resume.save(1, {"x": 1})
    same = ResumeFolder(tmp_path / "r", "a")
    assert same.last_round() == 1 and same.load() == {"x": 1} and same.previous_run == "run-a"
    other = ResumeFolder(tmp_path / "r", "b")
    assert other.last_round() == 0 and other.load() is None and other.previous_run == "run-a"


class Crash(Exception):
    pass


def federate(tiny_model_dir, clients, cfg, resume=None, crash_after=None):
    """A fresh model and method (as a new process would have), run through the engine; raises
    Crash right after round `crash_after` is saved."""
    def on_round(log):
        if log.round == crash_after:
            raise Crash

    method, model, state, _ = helpers.federate(tiny_model_dir, clients, cfg, resume=resume, on_round=on_round)
    method.apply_global(model, state)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, state


@pytest.mark.parametrize("method, extra", [
    ("fwdllm", {}), ("fedselft", {"selft": {"strategy": "gradient-variance"}}),
    ("fedit", {"dp": {"noise_multiplier": 1.0, "clip": 0.5}}),
    ("fedit", {"scaffold": True}),
    ("fedit", {"secagg": {"enabled": True}, "min_clients": 2}),
    ("fedkseed-pro", {"dp": {"noise_multiplier": 1.0, "clip": 0.5}, "dropout": 0.3}),
    ("fedkseed", {"dp": {"noise_multiplier": 1.0, "clip": 0.5, "noise": "clients"}, "secagg": {"enabled": True},
                  "min_clients": 2}),
])
def test_every_method_resumes_bit_identically(tiny_model_dir, sst2_prompts, tmp_path, method, extra):
    """The restore path of each method's own state (FwdLLM's direction and n on top of JOB's
    pairs, FedSelFT's selection, the server optimizer, the DP round counter, SCAFFOLD's control
    variates; secure aggregation's keys are made afresh, its sums the same, and the clients' DP
    noise shares drawn again the same), in process."""
    import torch

    from edgetune.config import FinetuneParams

    clients = make_clients(sst2_prompts, n=4, size=16)
    cfg = FinetuneParams(method=method, num_rounds=3, local_steps=1, batch_size=4, sample_rate=0.5,
                         lr=5e-3, zo={"K": 16, "lr": 1e-4}, **extra)
    ref_weights, ref_state = federate(tiny_model_dir, clients, cfg)
    with pytest.raises(Crash):
        federate(tiny_model_dir, clients, cfg, ResumeFolder(tmp_path, "key"), crash_after=2)
    weights, state = federate(tiny_model_dir, clients, cfg, ResumeFolder(tmp_path, "key"))
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
