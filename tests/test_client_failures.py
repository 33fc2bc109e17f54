"""Client failures in the round loop, on a tiny Llama with the real tokenizer and real SST-2:
seeded dropouts, clients whose local update raises, min_clients with retries, and the params
check that rejects an impossible min_clients before any work."""

from __future__ import annotations

import importlib
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from edgetune.cli import run_main
from edgetune.config import FinetuneParams, ParamsError, parse_params
from edgetune.federated import registry
from edgetune.federated.engine import TooFewClients, drop_out, round_generator, sample_clients
from edgetune.federated.methods import get_method
from tests.conftest import REPO
from tests.helpers import build, federate, make_clients


def params(name="fedit", rounds=2, sample_rate=1.0) -> FinetuneParams:
    return FinetuneParams(method=name, num_rounds=rounds, sample_rate=sample_rate, local_steps=2, batch_size=4,
                          lr=5e-3, zo={"K": 64, "lr": 1e-4}, selft={"strategy": "random", "layers": 1})


def run(tiny_model_dir, clients, name="fedit", rounds=2, sample_rate=1.0, patch=None, **faults):
    cfg = params(name, rounds, sample_rate)
    _, _, state, history = federate(tiny_model_dir, clients, cfg, patch=patch, **faults)
    return state, history


def same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fail_at_start(bad: set[int], calls: list | None = None):
    """Patch: the clients in `bad` raise before any local work (`calls` records every update)."""
    def patch(method):
        update = method.client_update

        def failing(model, down, data, rng):
            if calls is not None:
                calls.append(data.client_id)
            if data.client_id in bad:
                raise RuntimeError(f"client {data.client_id} lost its connection")
            return update(model, down, data, rng)
        method.client_update = failing
    return patch


def fail_midway(bad: int):
    """Patch: client `bad` raises at its second loss evaluation, in the middle of its local
    work (a ZO client holds perturbed weights then, a FedSelFT client has frozen layers)."""
    def patch(method):
        update, loss = method.client_update, method.objective.loss
        seen = {"client": None, "losses": 0}

        def counting_loss(model, batch):
            if seen["client"] == bad:
                seen["losses"] += 1
                if seen["losses"] == 2:
                    raise RuntimeError("device out of memory")
            return loss(model, batch)

        def tracked(model, down, data, rng):
            seen["client"], seen["losses"] = data.client_id, 0
            return update(model, down, data, rng)
        method.objective.loss = counting_loss
        method.client_update = tracked
    return patch


# --------------------------------------------------------------------------- dropouts
def test_dropouts_are_seeded_by_seed_round_and_attempt():
    sampled = list(range(200))
    first = drop_out(round_generator(0, 3, 0), sampled, 0.3)
    assert first == drop_out(round_generator(0, 3, 0), sampled, 0.3)
    assert first != drop_out(round_generator(0, 4, 0), sampled, 0.3)
    assert first != drop_out(round_generator(1, 3, 0), sampled, 0.3)
    assert 30 < len(first) < 90
    assert drop_out(round_generator(0, 3, 0), sampled, 0.0) == set()


def test_same_seed_same_dropped_clients(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts, n=4, size=16)
    s1, h1 = run(tiny_model_dir, clients, rounds=3, dropout=0.5)
    s2, h2 = run(tiny_model_dir, clients, rounds=3, dropout=0.5)
    assert [h.dropped for h in h1] == [h.dropped for h in h2]
    assert [h.clients for h in h1] == [h.clients for h in h2]
    assert same_state(s1, s2)
    assert any(h.dropped for h in h1)
    for h in h1:
        assert h.metrics()["clients_dropped"] == len(h.dropped)
        assert h.metrics()["clients_aggregated"] == len(h.clients) >= 1


def test_dropout_zero_changes_nothing(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts, n=4, size=16)
    s0, h0 = run(tiny_model_dir, clients, sample_rate=0.5)  # no failure keys at all
    s1, h1 = run(tiny_model_dir, clients, sample_rate=0.5, dropout=0.0, min_clients=1, round_retries=2)
    assert same_state(s0, s1)
    assert [(h.clients, h.train_loss, h.bytes_up_per_client) for h in h0] == \
           [(h.clients, h.train_loss, h.bytes_up_per_client) for h in h1]
    # the sampling stream is the one it always was: one draw per round from default_rng(seed)
    rng = np.random.default_rng(0)
    assert [h.clients for h in h0] == [sample_clients(rng, 4, 0.5) for _ in h0]
    assert FinetuneParams() == FinetuneParams(dropout=0.0, min_clients=1, round_retries=2)


def test_dropouts_do_not_change_who_is_sampled(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts, n=4, size=16)
    _, plain = run(tiny_model_dir, clients, rounds=3, sample_rate=0.5)
    _, lossy = run(tiny_model_dir, clients, rounds=3, sample_rate=0.5, dropout=0.3)
    for p, d in zip(plain, lossy):
        if d.retries == 0:
            assert sorted(d.clients + d.dropped) == p.clients


# --------------------------------------------------------------------------- failing clients
def test_a_failing_client_is_dropped_and_the_round_aggregates_the_others(tiny_model_dir, sst2_prompts,
                                                                         caplog):
    clients = make_clients(sst2_prompts, n=3, size=16)
    with caplog.at_level("WARNING", logger="edgetune.federated.engine"):
        state, history = run(tiny_model_dir, clients, patch=fail_at_start({1}))
    assert [h.clients for h in history] == [[0, 2], [0, 2]]
    assert [h.dropped for h in history] == [[1], [1]]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("round 1: client 1 failed" in w and "lost its connection" in w for w in warnings)
    assert any("round 2: client 1 failed" in w for w in warnings)
    # metered as exchanged: all three received the broadcast, two replied
    last = history[-1]
    assert last.bytes_exchanged == 3 * last.bytes_down_per_client + 2 * last.bytes_up_per_client
    assert last.metrics()["clients_dropped"] == 1 and last.metrics()["clients_aggregated"] == 2
    initial, _ = build(tiny_model_dir, params())
    assert not same_state(state, initial.init_state(None))


@pytest.mark.parametrize("name", ["fedit", "fedselft", "job"])
def test_a_client_failing_midway_leaves_the_shared_model_as_it_was(tiny_model_dir, sst2_prompts, name):
    clients = make_clients(sst2_prompts, n=3, size=16)
    midway, h1 = run(tiny_model_dir, clients, name, patch=fail_midway(1))
    at_start, h2 = run(tiny_model_dir, clients, name, patch=fail_at_start({1}))
    assert [h.dropped for h in h1] == [h.dropped for h in h2] == [[1], [1]]
    assert same_state(midway, at_start)


# --------------------------------------------------------------------------- min_clients
def test_too_few_clients_is_retried_then_fails_clearly(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts, n=4, size=16)
    calls = []
    with pytest.raises(TooFewClients) as err:
        run(tiny_model_dir, clients, sample_rate=0.5, min_clients=2, round_retries=2,
            patch=fail_at_start({0, 1, 2}, calls))
    assert len(calls) == 3 * 2  # first try + 2 retries, 2 clients each
    message = str(err.value)
    assert message.startswith("round 1:") and "finetune.min_clients = 2" in message
    assert "after 2 retries" in message and "lost its connection" in message


def test_a_retry_with_a_fresh_sample_saves_the_round(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts, n=4, size=16)
    first = sample_clients(np.random.default_rng(0), 4, 0.5)  # round 1's sample
    retry = sample_clients(round_generator(0, 1, 1), 4, 0.5)  # its fresh sample on a retry
    failing = set(first) - set(retry)
    assert failing  # seed 0: [2, 3], then [1, 3]
    _, history = run(tiny_model_dir, clients, rounds=1, sample_rate=0.5, min_clients=2,
                     patch=fail_at_start(failing))
    h = history[0]
    assert h.retries == 1 and h.clients == retry and h.dropped == sorted(failing)
    # both tries' broadcasts count, and every reply sent: the first try's survivor's too
    # (discarded, as its try fell short); replies differ by a few bytes of loss metadata
    discarded = h.bytes_exchanged - 4 * h.bytes_down_per_client - 2 * h.bytes_up_per_client
    assert abs(discarded - h.bytes_up_per_client) < 64


def test_min_clients_above_a_round_is_a_params_error():
    parse_params({"partition": {"num_clients": 4}, "finetune": {"sample_rate": 0.5, "min_clients": 2}})
    too_many = r"finetune\.min_clients: 3 .*num_clients 4 x finetune\.sample_rate 0\.5"
    with pytest.raises(ParamsError, match=too_many):
        parse_params({"partition": {"num_clients": 4}, "finetune": {"sample_rate": 0.5, "min_clients": 3}})
    with pytest.raises(ParamsError, match=r"finetune\.min_clients: 2 .*mezo runs one centralized client"):
        parse_params({"finetune": {"method": "mezo", "min_clients": 2}})
    for key, value in [("dropout", 1.0), ("dropout", -0.1), ("min_clients", 0), ("round_retries", -1)]:
        with pytest.raises(ParamsError, match=f"finetune.{key}"):
            parse_params({"finetune": {key: value}})
    assert {n for n in registry.names() if get_method(n).centralized} == {"mezo"}


def test_finetune_stage_exits_2_on_impossible_min_clients(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["finetune"]["min_clients"] = raw["partition"]["num_clients"] + 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "stages.finetune", "--model", "m", "--partitions", "p",
                           "--out", "o", "--plots", "pl", "--metrics", "m.json"], cwd=tmp_path,
                          capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error:") and "finetune.min_clients" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.fixture
def sigterm_restored():
    """run_main installs a SIGTERM handler; give pytest its own back."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def test_finetune_stage_fails_with_its_mlflow_run_failed(tiny_model_dir, sst2_prompts, tmp_path, monkeypatch,
                                                         sigterm_restored, capsys):
    import mlflow
    import pandas as pd

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    parts = tmp_path / "partitions"
    parts.mkdir()
    for c in make_clients(sst2_prompts, n=4, size=16):
        frame = pd.DataFrame({"prompt": c.prompts, "label": c.targets})
        frame.to_parquet(parts / f"client_{c.client_id}.parquet")
    raw = {"partition": {"num_clients": 4}, "tracking": {"experiment": "failures"},
           "finetune": {"num_rounds": 1, "local_steps": 1, "sample_rate": 0.5, "min_clients": 2,
                        "dropout": 0.95, "round_retries": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "finetuned"
    argv = ["--params", str(tmp_path / "params.yaml"), "--model", str(tiny_model_dir),
            "--partitions", str(parts), "--out", str(out), "--plots", str(tmp_path / "plots"),
            "--metrics", str(tmp_path / "m.json")]
    stage = importlib.import_module("stages.finetune")
    with pytest.raises(SystemExit) as exit_:
        run_main(stage.main, argv)
    assert exit_.value.code == 1  # a run-time failure, not bad input: one line, no traceback
    lines = capsys.readouterr().err.strip().splitlines()
    assert re.match(r"error: round 1: .*finetune.min_clients = 2", lines[-1])
    assert not any("Traceback" in line for line in lines)
    assert not out.exists() and not (tmp_path / "m.json").exists()
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("failures").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("finetune", "FAILED")]
