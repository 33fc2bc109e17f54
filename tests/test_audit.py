"""The memorization audit (edgetune/audit.py): canaries planted where the config says, non-members
never given to a client, and exposure / membership AUC that rise when a model memorizes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetune.config import AuditParams, PartitionParams


def test_exposure_is_the_rank_in_bits_and_the_fit_extrapolates_beyond_it():
    from edgetune.audit import exposure

    rng = np.random.default_rng(0)
    candidates = rng.normal(40.0, 3.0, size=1023)
    best = exposure(20.0, candidates)  # far more likely than every candidate
    assert best["rank"] == 1 and best["exposure"] == pytest.approx(10.0)
    assert best["exposure_fit"] > 15  # 6.7 sigma out: far beyond what 1,023 candidates can rank
    middle = exposure(float(np.median(candidates)), candidates)
    assert middle["exposure"] == pytest.approx(1.0, abs=0.05)  # half the candidates are likelier
    assert middle["exposure_fit"] == pytest.approx(1.0, abs=0.2)


def test_secrets_are_seeded_distinct_and_never_a_candidate():
    from edgetune.audit import secrets

    cfg = AuditParams(canaries=3, candidates=200, digits=8, seed=1)
    canaries, candidates = secrets(cfg)
    assert secrets(cfg) == (canaries, candidates)
    assert len(set(canaries + candidates)) == 203
    assert all(len(s) == 9 and s[4] == " " for s in canaries)
    assert secrets(cfg.model_copy(update={"seed": 2}))[0] != canaries


@pytest.fixture(scope="module")
def planted(tmp_path_factory, mirror):
    """SST-2's first 400 train rows over 4 clients, 2 canaries (1 and 4 copies) on clients 0 and 2."""
    from edgetune.audit import hold_out, plant
    from edgetune.partition import partition
    from edgetune.tasks import get_task

    cfg = AuditParams(canaries=2, repetitions=[1, 4], clients=[0, 2], members=20, candidates=50)
    train = get_task("sst2").load("train", mirror).select(range(400))
    rest, nonmembers = hold_out(train, cfg)
    clients = partition(rest, PartitionParams(scheme="iid", num_clients=4))
    out = tmp_path_factory.mktemp("audit")
    return cfg, clients, plant(clients, cfg, "label", nonmembers, out), nonmembers, out


def test_canaries_go_to_the_audited_clients_with_their_repetitions(planted):
    from edgetune.audit import secrets

    cfg, before, after, _, out = planted
    canaries, _ = secrets(cfg)
    record = json.loads((out / "audit" / "canaries.json").read_text())
    assert [c["secret"] for c in record["canaries"]] == canaries
    assert [c["repetitions"] for c in record["canaries"]] == [1, 4]

    def copies(ds, secret):
        return sum(secret in p for p in ds["prompt"])

    assert [copies(c, canaries[0]) for c in after] == [1, 0, 0, 0]
    assert [copies(c, canaries[1]) for c in after] == [2, 0, 2, 0]  # dealt over clients 0 and 2
    assert [len(a) - len(b) for a, b in zip(after, before)] == [3, 0, 2, 0]
    assert all(after[1][k] == before[1][k] for k in ("prompt", "label"))  # other clients untouched


def test_non_members_are_held_out_of_every_client_and_members_are_clients_rows(planted):
    import pandas as pd

    cfg, before, after, nonmembers, out = planted
    held = set(pd.read_parquet(out / "audit" / "nonmembers.parquet")["prompt"])
    members = set(pd.read_parquet(out / "audit" / "members.parquet")["prompt"])
    assert held == set(nonmembers["prompt"]) and len(held) == 20 and len(members) == 20
    assert not held & {p for c in after for p in c["prompt"]}
    assert members <= {p for c in before for p in c["prompt"]}  # training rows, never a canary
    assert len({i for i, c in enumerate(before) if members & set(c["prompt"])}) > 2  # not one client's


def train_on(model, tok, task, prompts, targets, steps: int, lr: float = 3e-3):
    """Plain AdamW on the task objective (what a backprop client does), whole rows cycled."""
    import torch

    from edgetune.objectives import objective_for

    objective = objective_for(task, tok, 64, model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        s = (step * 8) % len(prompts)
        batch = objective.batch(prompts[s:s + 8], targets[s:s + 8])
        objective.loss(model, batch).backward()
        opt.step()
        opt.zero_grad()


def test_exposure_and_membership_auc_rise_when_a_model_memorizes(tmp_path, tiny_model_dir, mirror):
    """Dolly rows over 2 clients, a canary planted 16 times on client 0: a tiny model trained
    hard on the clients' rows ranks that canary first among 200 candidates (it did not before)
    and tells their rows from held-out ones."""
    import datasets

    from edgetune.audit import audited_partition, measure
    from edgetune.models import load_hf
    from edgetune.tasks import get_task

    task = get_task("dolly")
    cfg = AuditParams(canaries=1, repetitions=[16], clients=[0], members=16, candidates=200)
    train = task.load("train", mirror).select(range(96))
    split = PartitionParams(scheme="iid", num_clients=2, min_size=1)
    clients = audited_partition(train, split, cfg, "target", tmp_path)
    model, tok = load_hf(tiny_model_dir)
    before = measure(model, tok, task, tmp_path / "audit", cfg, max_length=64)
    assert before["exposure_rep16"] < 6
    every: datasets.Dataset = datasets.concatenate_datasets(clients)  # the federation's rows
    train_on(model, tok, task, every["prompt"], every["target"], steps=120)
    after = measure(model, tok, task, tmp_path / "audit", cfg, max_length=64)
    assert after["canaries"][0]["rank"] == 1 and after["exposure_rep16"] == pytest.approx(np.log2(201))
    assert after["mia_auc"] > 0.8 > before["mia_auc"]
    assert after["member_loss"] < after["nonmember_loss"]



def test_a_run_with_audit_or_export_knobs_is_named_by_them():
    """Every params block can be changed and still name the MLflow parent run (a block missing
    from tracking.NAME_ORDER used to stop the flow)."""
    from edgetune.config import ExportParams, FinetuneParams, Params
    from edgetune.tracking import parent_run_name

    params = Params(audit=AuditParams(canaries=6, members=64), export=ExportParams(formats=["gguf-q8_0"]),
                    finetune=FinetuneParams(num_rounds=3))
    assert parent_run_name(params).startswith("fedit/lora sst2 num_rounds=3 formats=")
