"""The one "build a method and run a few rounds" helper the tests share."""

from __future__ import annotations

from edgetune.config import FinetuneParams
from edgetune.federated.engine import ClientData, run_federation


def make_clients(sst2_prompts, n=4, size=24) -> list[ClientData]:
    """`n` clients of `size` consecutive SST-2 rows each."""
    prompts, labels = sst2_prompts
    return [ClientData(i, prompts[i * size:(i + 1) * size], labels[i * size:(i + 1) * size])
            for i in range(n)]


def federate(model_dir, clients: list[ClientData], cfg: FinetuneParams, task: str = "sst2",
             patch=None, **engine):
    """(method, model, state, history): cfg's method and model as the finetune stage builds
    them, `patch(method)` applied, then cfg.num_rounds rounds on the local engine with cfg's
    engine options (finetune.attack, dropout, ...), `engine` overriding them."""
    from edgetune.federated.train import attack_of, prepare
    from edgetune.tasks import get_task

    method, model = prepare(model_dir, get_task(task), cfg, len(clients), cfg.sample_rate)
    if patch is not None:
        patch(method)
    options = {"dropout": cfg.dropout, "min_clients": cfg.min_clients, "round_retries": cfg.round_retries,
               "attack": attack_of(cfg, clients), **engine}
    state, history = run_federation(method, model, clients, num_rounds=cfg.num_rounds,
                                    sample_rate=cfg.sample_rate, seed=cfg.seed, **options)
    return method, model, state, history
