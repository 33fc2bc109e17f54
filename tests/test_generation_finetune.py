"""Generation tasks through fine-tuning and evaluation: the federated methods train on answer
tokens (edgetune.objectives.Answer) with the same engine, and evaluate scores greedy answers."""

from __future__ import annotations

import pytest
import torch

from edgetune.config import EvaluateParams, FinetuneParams
from edgetune.evaluate import evaluate_model
from edgetune.federated.engine import ClientData
from edgetune.tasks import get_task
from tests import helpers
from tests.helpers import make_clients


@pytest.fixture(scope="module")
def squad_clients(mirror):
    rows = get_task("squad").load("train", mirror).select(range(48))
    prompts, targets = list(rows["prompt"]), list(rows["target"])
    return [ClientData(i, prompts[i::2], targets[i::2]) for i in range(2)]


def federate(tiny_model_dir, clients, method, rounds, **overrides):
    cfg = FinetuneParams(method=method, num_rounds=rounds, sample_rate=1.0, local_steps=3,
                         batch_size=4, max_length=256, **overrides)
    return helpers.federate(tiny_model_dir, clients, cfg, "squad")


def pooled_answer_loss(method, model, clients) -> float:
    prompts = [p for c in clients for p in c.prompts]
    targets = [t for c in clients for t in c.targets]
    with torch.no_grad():
        return method.loss(model, prompts, targets).item()


def test_fedit_on_squad_lowers_the_answer_loss(tiny_model_dir, squad_clients):
    method, model, state, history = federate(tiny_model_dir, squad_clients, "fedit", rounds=4, lr=1e-2)
    trained = pooled_answer_loss(method, model, squad_clients)
    with model.disable_adapter():
        untrained = pooled_answer_loss(method, model, squad_clients)
    assert trained < untrained - 0.1
    assert history[-1].train_loss < history[0].train_loss


def test_fedkseed_on_squad_sends_the_same_bytes_as_on_classification(tiny_model_dir, squad_clients, sst2_prompts):
    _, _, _, squad = federate(tiny_model_dir, squad_clients, "fedkseed", rounds=1, trainable="lora")
    cfg = FinetuneParams(method="fedkseed", num_rounds=1, sample_rate=1.0, local_steps=3, batch_size=4,
                         trainable="lora")
    *_, history = helpers.federate(tiny_model_dir, make_clients(sst2_prompts, n=2), cfg)
    assert squad[0].bytes_up_per_client == history[0].bytes_up_per_client < 1000
    assert torch.isfinite(torch.tensor(squad[0].train_loss))


def test_evaluate_scores_greedy_answers_with_exact_match_and_f1(tiny_model_dir, mirror, tmp_path):
    evals = get_task("squad").load("dev", mirror).select(range(6))
    evals.to_parquet(tmp_path / "eval.parquet")
    (tmp_path / "wikitext2_test.txt").write_text((mirror / "wikitext2" / "wiki.test.raw").read_text()[:20_000])
    cfg = EvaluateParams(batch_size=3, ppl_windows=1, ppl_seq_len=64, latency_new_tokens=2)
    metrics = evaluate_model(str(tiny_model_dir), str(tmp_path), "squad", cfg)
    assert {"exact_match", "f1", "score", "perplexity"} <= set(metrics)
    assert 0 <= metrics["exact_match"] <= metrics["f1"] <= 1 and metrics["score"] == metrics["f1"]
    assert "accuracy" not in metrics and metrics["eval_examples"] == 6
