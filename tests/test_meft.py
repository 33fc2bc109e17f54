"""Seed-scalar (MEFT) methods through the one round loop, on a tiny Llama with the real
tokenizer and real SST-2: only seeds and scalars travel, and any process that replays the
exchanged dictionary gets bit-identical weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgetune.config import FinetuneParams
from edgetune.federated.methods.job import job_seed
from edgetune.models import load_hf
from edgetune.objectives import LabelWords
from edgetune.tasks import get_task
from tests.conftest import REPO
from tests.rebuild_from_checkpoint import weights_hash
from tests.helpers import federate, make_clients


def run(tiny_model_dir, clients, method_name, rounds=2, tmp=None, **overrides):
    cfg = FinetuneParams(method=method_name, num_rounds=rounds, sample_rate=0.5, local_steps=3,
                         batch_size=8, **overrides)
    method, model, state, history = federate(tiny_model_dir, clients, cfg, checkpoint_dir=tmp)
    return cfg, method, model, method.tok, state, history


PHILOX_RADEMACHER = {"generator": "philox", "distribution": "rademacher"}


REBUILD_CASES = [  # (method, trainable set, zo.samples, zo sampler knobs)
    ("job", "full", 1, {}), ("fedkseed", "full", 1, {}), ("fedkseed-pro", "full", 1, {}),
    ("fedkseed", "lora", 1, {}), ("fwdllm", "lora", 1, {}), ("job", "prefix", 2, {}),
    ("fedkseed", "bitfit", 3, {}), ("fedkseed", "full", 1, PHILOX_RADEMACHER),
    ("job", "full", 1, PHILOX_RADEMACHER), ("fedkseed", "lora", 2, {"generator": "philox"}),
    ("fedkseed", "full", 1, {"lr_decay_rounds": 2}), ("fwdllm", "lora", 1, {"lr_decay_rounds": 1}),
]


@pytest.fixture(scope="module")
def rebuilt(tiny_model_dir, sst2_prompts, tmp_path_factory) -> list[tuple[str, str, str]]:
    """Per REBUILD_CASES entry: (hash of the trained weights in this process, hash of the
    same weights rebuilt by a fresh process from base weights + exchanged dictionary, hash of
    the untrained weights). One fresh process rebuilds every case."""
    cases, hashes = [], []
    for i, (name, trainable, samples, sampler) in enumerate(REBUILD_CASES):
        tmp = tmp_path_factory.mktemp(f"rebuild{i}")
        cfg, method, model, _, state, _ = run(tiny_model_dir, make_clients(sst2_prompts), name,
                                              rounds=3, tmp=tmp, trainable=trainable,
                                              zo={"K": 64, "lr": 1e-4, "samples": samples, **sampler})
        method.export(model, state, tmp / "out")  # syncs the shared model to the final round
        in_process = weights_hash(method.params)
        torch.manual_seed(cfg.seed)
        fresh = method.prepare_model(load_hf(tiny_model_dir)[0])
        hashes.append((in_process, weights_hash([p for p in fresh.parameters() if p.requires_grad])))
        cases.append([cfg.model_dump_json(), str(tmp / "global.safetensors")])
    listing = tmp_path_factory.mktemp("cases") / "cases.json"
    listing.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-m", "tests.rebuild_from_checkpoint", str(tiny_model_dir), str(listing)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replayed = proc.stdout.strip().splitlines()[-len(cases):]
    return [(ours, theirs, untrained) for (ours, untrained), theirs in zip(hashes, replayed, strict=True)]


@pytest.mark.parametrize("case", range(len(REBUILD_CASES)),
                         ids=["-".join(map(str, (n, t, s, *x.values()))) for n, t, s, x in REBUILD_CASES])
def test_rebuild_in_a_fresh_process_is_bit_identical(rebuilt, case):
    in_process, fresh_process, untrained = rebuilt[case]
    assert fresh_process == in_process
    assert in_process != untrained  # and the weights did move


def test_only_seeds_and_scalars_travel(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    *_, job_hist = run(tiny_model_dir, clients, "job", zo={"K": 4096})
    *_, ks_hist = run(tiny_model_dir, clients, "fedkseed", zo={"K": 4096})
    last_job, last_ks = job_hist[-1], ks_hist[-1]
    # JOB: 3 steps x (8-byte seed + 4-byte scalar) + header, both ways (2 clients' pairs down)
    assert last_job.bytes_up_per_client < 400 and last_job.bytes_down_per_client < 500
    # FedKSeed: K=4096 float32 scalars down, 3 (index, scalar) pairs up: under 18 KB in all
    assert 4096 * 4 <= last_ks.bytes_down_per_client < 4096 * 4 + 400
    assert last_ks.bytes_up_per_client + last_ks.bytes_down_per_client < 18_000


def test_job_seeds_are_never_reused():
    seeds = {job_seed(0, r, c, s) for r in range(1, 6) for c in range(8) for s in range(10)}
    assert len(seeds) == 5 * 8 * 10


def test_fedkseed_pro_prefers_seeds_with_large_scalars():
    from edgetune.federated.methods.fedkseed import seed_probabilities

    importance = torch.tensor([0.0, 1.0, 0.1, 0.0])
    seen = torch.tensor([False, True, True, False])
    p = seed_probabilities(importance, seen, temperature=0.5)
    assert abs(p.sum().item() - 1) < 1e-6 and p[1] > p[0] > p[2]


def test_mezo_lowers_the_loss_of_a_tiny_model(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts, n=1, size=64)
    model, tok = load_hf(tiny_model_dir)
    objective = LabelWords(tok, get_task("sst2").label_words, 64)
    batch = objective.batch(clients[0].prompts, clients[0].targets)
    with torch.no_grad():
        before = objective.loss(model, batch).item()
    cfg, method, model, tok, state, _ = run(tiny_model_dir, clients, "mezo", rounds=10,
                                            trainable="lora", zo={"lr": 2e-2, "eps": 1e-3})
    method.apply_global(model, state)
    with torch.no_grad():
        after = objective.loss(model, batch).item()
    assert after < before - 0.01


def test_fwdllm_adapts_the_number_of_perturbations_to_the_variance(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    low = run(tiny_model_dir, clients, "fwdllm", rounds=2,
              zo={"var_threshold": 1e9, "perturbations": 3, "lr": 1e-3})[-1]
    high = run(tiny_model_dir, clients, "fwdllm", rounds=2,
               zo={"var_threshold": 1e-12, "perturbations": 3, "max_perturbations": 4, "lr": 1e-3})[-1]
    assert [h.extra["perturbations"] for h in low] == [2, 1]  # calm scalars: fewer perturbations
    assert [h.extra["perturbations"] for h in high] == [4, 4]  # noisy: more, capped
    # each step uploads n pairs: round 2 of `high` ran with n = 4, `low` with n = 2
    assert high[-1].bytes_up_per_client > low[-1].bytes_up_per_client


def test_n_spsa_uploads_one_pair_per_perturbation(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    cfg, method, model, _, state, _ = run(tiny_model_dir, clients, "job", rounds=1, zo={"samples": 3})
    assert len(state["seeds"]) == 2 * cfg.local_steps * 3  # 2 sampled clients
    assert len(set(state["seeds"].tolist())) == len(state["seeds"])  # never reused
