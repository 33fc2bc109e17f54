"""finetune.backend: flower — the same methods on Flower's Deployment Engine (a SuperLink and two
SuperNodes on loopback, each owning two clients' partitions) and Simulation Engine (Ray), against
the local backend with the same params: same clients each round, same losses, same metered
bytes, and the same final global state, bit for bit (the Simulation Engine: test_flower_simulation.py). FedIT goes through the Prefect flow
(flows/federation.py) as a user would run it, with its rounds logged to MLflow by the ServerApp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from edgetune.config import FinetuneParams, load_params
from edgetune.federated.engine import RoundLog
from edgetune.federated.train import finetune
from tests.conftest import REPO

pytestmark = pytest.mark.flower

NUM_CLIENTS = 4
HEADERS = 2048, 512  # Flower's headers: per message, per tensor (bytes)


@pytest.fixture(scope="module")
def partitions(tmp_path_factory, sst2_prompts) -> Path:
    prompts, labels = sst2_prompts
    out = tmp_path_factory.mktemp("partitions")
    for i in range(NUM_CLIENTS):
        rows = slice(i * 24, (i + 1) * 24)
        pd.DataFrame({"prompt": prompts[rows], "label": labels[rows]}).to_parquet(out / f"client_{i:04d}.parquet")
    return out


def finetune_params(method: str, rounds: int, **flower) -> dict:
    """FedKSeed-LoRA, or FedIT with dropouts (a dropped client got the broadcast, sends nothing)."""
    extra = {"trainable": "lora", "zo": {"K": 64, "lr": 1e-3, "eps": 1e-2}} if method == "fedkseed" else \
        {"lr": 5e-3, "dropout": 0.3}
    return {"method": method, "num_rounds": rounds, "sample_rate": 0.5, "local_steps": 2, "batch_size": 4,
            "flower": {"nodes": 2, "round_timeout": 300, **flower}, **extra}


def run(tiny_model_dir, partitions, out: Path, cfg: FinetuneParams):
    summary, history = finetune(tiny_model_dir, partitions, "sst2", cfg, out)
    return summary, history, load_file(out / "checkpoint" / "global.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def assert_rounds_match(local: list[RoundLog], flower: list[RoundLog], tensors: int, job_bytes: int,
                        personal: bool = False) -> None:
    """`personal`: each client also got a personal message as large as the broadcast (SCAFFOLD's
    correction); Flower sends equal chunks once per message (the first round's all-zero
    correction costs almost nothing), so only the broadcast half bounds the wire from below."""
    for a, b in zip(local, flower, strict=True):
        assert (a.round, a.clients, a.dropped, a.rejected, a.train_loss) == \
            (b.round, b.clients, b.dropped, b.rejected, b.train_loss)
        assert (a.bytes_up_per_client, a.bytes_down_per_client) == (b.bytes_up_per_client, b.bytes_down_per_client)
        # Flower's own serialization of the same payloads, per message: the metered bytes plus
        # Flower's headers (message, records, a numpy header per tensor) and, going down, the job
        # record (the finetune params as JSON); a dropped client received the broadcast too, and
        # a rejected reply crossed the wire like the others
        replied = len(b.clients) + len(b.rejected)
        overhead, sent = HEADERS[0] + HEADERS[1] * tensors, replied + len(b.dropped)
        assert 0 < b.extra["wire_bytes_up"] - replied * b.bytes_up_per_client < replied * overhead
        down = b.extra["wire_bytes_down"] - b.extra["bytes_catchup"]
        if personal:
            overhead, broadcast = overhead + HEADERS[0] + HEADERS[1] * tensors, b.bytes_down_per_client / 2
            assert 0 < down - sent * broadcast and down - sent * b.bytes_down_per_client < sent * (overhead + job_bytes)
            continue
        assert 0 < down - sent * b.bytes_down_per_client < sent * (overhead + job_bytes)


def keyed_fedkseed(tmp_path) -> dict:
    """FedKSeed-LoRA with keyed seeds and sealed messages (the ClientApps read the federation key
    on their node), one client altering its reply after sealing it."""
    key = tmp_path / "federation.key"
    key.write_text("5e" * 32)
    raw = {**finetune_params("fedkseed", rounds=3), "attack": {"fraction": 0.25, "kind": "tampered"}}
    raw["zo"] = {**raw["zo"], "secret": f"file:{key}"}
    return raw


def test_fedit_with_secure_aggregation_on_the_deployment_engine_matches_the_local_backend(
        tiny_model_dir, partitions, tmp_path):
    """finetune.secagg: each SuperNode registers a key per client at the hello, its ClientApps
    mask the replies (each message in a process of its own: the keys live in the node's state),
    and the replying clients' nodes reveal their pair seeds with a client that dropped out. The
    unmasked sums are integers, so the global state is the local backend's bit for bit. (FedKSeed
    under secagg on Flower: tests/test_flower_simulation.py.)"""
    raw = {**finetune_params("fedit", rounds=1), "sample_rate": 0.75, "min_clients": 2,
           "secagg": {"enabled": True}}
    _, local, local_state = run(tiny_model_dir, partitions, tmp_path / "local", FinetuneParams(**raw))
    cfg = FinetuneParams(**raw, backend="flower")
    _, flower, flower_state = run(tiny_model_dir, partitions, tmp_path / "flower", cfg)
    assert same(local_state, flower_state)
    assert_rounds_match(local, flower, len(local_state), len(cfg.model_dump_json()))
    recovered = [h for h in flower if h.dropped and len(h.clients) >= 2]
    assert recovered, "the seed drops no client from a round that still aggregates; pick another"
    assert all(h.extra["bytes_secagg_recovery"] == l.extra["bytes_secagg_recovery"] > 0
               for h, l in zip(flower, local) if h in recovered)


def test_a_supernode_restarted_mid_run_rejoins_with_new_secagg_keys(tiny_model_dir, partitions, tmp_path):
    """FedKSeed under secagg on the Deployment Engine; the SuperNode of clients 2 and 3 is killed
    after round 1 and started again (a phone rebooting): it comes back under a new node id with
    no keys and no state. Round 2 goes on without its clients (the others reveal their seeds
    with them); before round 3 the server says hello to the new node, takes its new public keys
    into the roster and sends it the broadcasts it missed, and all four clients are aggregated
    again."""
    import psutil

    from tests.test_resume import start

    raw = {**finetune_params("fedkseed", rounds=3), "sample_rate": 1.0, "min_clients": 2,
           "secagg": {"enabled": True}, "flower": {"nodes": 2, "round_timeout": 60}}
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump({
        "partition": {"num_clients": NUM_CLIENTS}, "tracking": {"experiment": "resume"},
        "finetune": {**raw, "backend": "flower"}}))
    proc = start((tmp_path, tiny_model_dir, partitions), folder)
    while not list((folder / "out.resume").glob("round-*.pt")):  # round 1 is saved
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    def command(p) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # a ClientApp that just exited
            return ""

    node, = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "flower-supernode" in command(p) and '"2,3"' in command(p)]
    cmd, env, cwd = node.cmdline(), node.environ(), node.cwd()
    os.killpg(node.pid, signal.SIGKILL)
    restarted = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        os.killpg(restarted.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    rounds = json.loads((folder / "out.flower" / "history.json").read_text())["history"]
    assert [sorted(r["clients"]) for r in rounds] == [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3]]
    assert rounds[1]["extra"]["bytes_secagg_recovery"] > 0
    assert rounds[2]["extra"]["bytes_catchup"] > 0  # the new node replayed rounds 1 and 2 first


def test_loopback_processes_allow_late_heartbeats():
    """On a busy machine a task's heartbeat may come late: the SuperLink and SuperNodes started
    on loopback start as Flower's own CLIs but fail a task only after LOOPBACK_PATIENCE x 30 s."""
    from edgetune.federated.flower.deploy import LOOPBACK_PATIENCE, patient_command

    for executable in ("flower-superlink", "flower-supernode"):
        cmd = patient_command([executable, "--help"])
        shown = subprocess.run(cmd, capture_output=True, text=True)
        assert shown.returncode == 0 and f"usage: {executable}" in shown.stdout
    patch = cmd[2].split("; from ")[0]
    probe = subprocess.run([sys.executable, "-c", patch + "; from flwr.supercore.corestate import sql_corestate as s; "
                            "print(s.HEARTBEAT_PATIENCE * s.HEARTBEAT_DEFAULT_INTERVAL)"], capture_output=True, text=True)
    assert int(probe.stdout) == LOOPBACK_PATIENCE * 30 >= 300


def test_fedit_through_the_prefect_federation_flow_matches_the_local_backend(tiny_model_dir, partitions, tmp_path):
    import mlflow

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # FedProx, local SGD and SCAFFOLD as well: a knob the ClientApp failed to read from the job
    # record, or a personal message it failed to merge, would train other weights than locally
    params["finetune"].update(finetune_params("fedit", rounds=2), proximal_mu=1.0, client_optimizer="sgd",
                              lr=0.1, scaffold=True)
    params["tracking"]["experiment"] = "federation"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_params(tmp_path / "params.yaml").finetune
    _, local, local_state = run(tiny_model_dir, partitions, tmp_path / "local", cfg)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(MLFLOW_TRACKING_URI=uri, PREFECT_HOME=str(tmp_path / ".prefect"))
    proc = subprocess.run([sys.executable, "-m", "flows.federation", "--params", str(tmp_path / "params.yaml"),
                           "--model", str(tiny_model_dir), "--partitions", str(partitions),
                           "--out", str(tmp_path / "flower")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "federation done" in proc.stdout
    flower_state = load_file(tmp_path / "flower" / "checkpoint" / "global.safetensors")
    record = json.loads((tmp_path / "flower.flower" / "history.json").read_text())
    flower = [RoundLog(**h) for h in record["history"]]
    assert same(local_state, flower_state)
    job_bytes = len(cfg.model_copy(update={"backend": "flower"}).model_dump_json())
    assert_rounds_match(local, flower, len(local_state), job_bytes, personal=True)
    assert any(h.dropped for h in flower)
    # the ServerApp logged every round into the flow's MLflow run
    client = mlflow.MlflowClient(uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("federation").experiment_id])
    assert mlrun.info.status == "FINISHED" and mlrun.data.metrics["final_train_loss"] == flower[-1].train_loss
    logged = client.get_metric_history(mlrun.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in logged] == [(h.round, h.train_loss) for h in flower]


def kill_federation(proc: subprocess.Popen) -> None:
    """SIGKILL the stage and every process of its federation (SuperLink with the ServerApp,
    SuperNodes with their ClientApps: each its own process group), by pid."""
    import signal

    import psutil

    family = psutil.Process(proc.pid).children(recursive=True)
    for p in family:
        try:
            if os.getpgid(p.pid) == p.pid:
                os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_keyed_fedkseed_killed_on_the_deployment_engine_resumes_as_the_local_backend(
        tiny_model_dir, partitions, tmp_path):
    """Keyed FedKSeed (keyed_fedkseed) on the Deployment Engine, kill -9 of the whole federation
    after a round, then the stage again: the ServerApp goes on from its last saved round, the
    restarted SuperNodes catch up on the broadcasts they missed, the tampered replies are
    rejected before aggregation (logged, their bytes metered), and the run ends as the local
    backend, bit for bit: same clients, losses, rejections and final state. FedIT is killed and
    resumed on the local backend in test_resume.py, where every method's resume bookkeeping is
    test_every_method_resumes_bit_identically."""
    from tests.test_resume import kill_after_round, start

    raw = keyed_fedkseed(tmp_path)
    _, local, local_state = run(tiny_model_dir, partitions, tmp_path / "local", FinetuneParams(**raw))
    assert [h.rejected for h in local] == [[], [0], [0]]  # the seeded attacker, whenever sampled
    folder = tmp_path / "cut"
    folder.mkdir()
    params = {"partition": {"num_clients": NUM_CLIENTS}, "tracking": {"experiment": "resume"},
              "finetune": {**raw, "backend": "flower"}}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    workspace = (tmp_path, tiny_model_dir, partitions)
    kill_after_round(start(workspace, folder), folder, 1, kill_federation)
    second = start(workspace, folder)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    assert same(local_state, load_file(folder / "out" / "checkpoint" / "global.safetensors"))
    record = json.loads((folder / "out.flower" / "history.json").read_text())
    resumed = [RoundLog(**h) for h in record["history"]]
    job_bytes = len(FinetuneParams(**raw, backend="flower").model_dump_json())
    assert_rounds_match(local, resumed, len(local_state), job_bytes)  # rejections and bytes too
    assert sum(h.extra["bytes_catchup"] for h in resumed) > 0  # restarted nodes replayed missed rounds
    assert (folder / "out" / "merged" / "config.json").is_file()
    assert not (folder / "out.resume").exists()
