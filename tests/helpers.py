"""The one "build a method and run a few rounds" helper the tests share."""

from __future__ import annotations

from edgetune.config import FinetuneParams
from edgetune.federated.engine import ClientData, run_federation
from edgetune.federated.setup import engine_options, prepare


def make_clients(sst2_prompts, n=4, size=24) -> list[ClientData]:
    """`n` clients of `size` consecutive SST-2 rows each."""
    prompts, labels = sst2_prompts
    return [ClientData(i, prompts[i * size:(i + 1) * size], labels[i * size:(i + 1) * size])
            for i in range(n)]


def build(model_dir, cfg: FinetuneParams, task: str = "sst2", num_clients: int = 1, runtime=None):
    """(method, model) as the finetune stage builds them (setup.prepare: adapters seeded by
    finetune.seed; with finetune.dp, the mechanism for num_clients; runtime: model.device and
    model.dtype as config.ModelParams, None = CPU float32)."""
    from edgetune.tasks import get_task

    return prepare(model_dir, get_task(task), cfg, num_clients, cfg.sample_rate, runtime)


def federate(model_dir, clients: list[ClientData], cfg: FinetuneParams, task: str = "sst2",
             patch=None, runtime=None, **engine):
    """(method, model, state, history): cfg's method and model as the finetune stage builds
    them (setup.prepare), `patch(method)` applied, then its rounds on the local engine with
    setup.engine_options, `engine` (run_federation's keywords) overriding them."""
    method, model = build(model_dir, cfg, task, len(clients), runtime)
    if patch is not None:
        patch(method)
    state, history = run_federation(method, model, clients, **{**engine_options(cfg, clients), **engine})
    return method, model, state, history


def noisy_lora_state(method, model):
    """The method's initial global state plus small seeded noise: LoRA B starts at zero, and
    with values every block has a gradient."""
    import torch

    torch.manual_seed(0)
    return {k: v + 0.01 * torch.randn_like(v) for k, v in method.init_state(model).items()}


def batch_gradients(method, model, state, client: ClientData, rng, batch_size: int = 8) -> list:
    """Per block, the task loss's gradient at `state` on the batch `rng` draws for `client`
    (what one local step of plain SGD follows)."""
    import torch

    from edgetune.federated.methods.weights import sample_batch

    method.load(state)
    model.train()
    loss = method.loss(model, *sample_batch(client, batch_size, rng))
    grads = torch.autograd.grad(loss, list(method.blocks.values()))
    model.eval()
    return list(grads)
