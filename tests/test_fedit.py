"""FedIT through the one round loop, on a tiny Llama with the real tokenizer and real SST-2."""

from __future__ import annotations

import pytest
import torch

from edgetune.config import FinetuneParams
from edgetune.federated.engine import sample_clients
from edgetune.federated.aggregation import weighted_mean
from edgetune.federated.protocol import Message, to_bytes
from edgetune.models import load_hf
from edgetune.scoring import encode
from tests.helpers import federate, make_clients


def run(tiny_model_dir, clients, rounds=3, tmp=None, **overrides):
    cfg = FinetuneParams(num_rounds=rounds, sample_rate=0.5, local_steps=3, batch_size=8,
                         lr=5e-3, **overrides)
    method, model, state, history = federate(tiny_model_dir, clients, cfg, checkpoint_dir=tmp)
    return method, model, method.tok, state, history


def test_weighted_mean_is_fedavg():
    a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}
    out = weighted_mean([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 5.0]))


def test_sampling_is_seeded_and_without_replacement():
    import numpy as np

    draws = [sample_clients(np.random.default_rng(1), 10, 0.3) for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) == 3


def test_only_lora_weights_travel_and_bytes_are_real(tiny_model_dir, sst2_prompts, tmp_path):
    method, model, _, state, history = run(tiny_model_dir, make_clients(sst2_prompts), rounds=2,
                                           tmp=tmp_path)
    assert state and all("lora_" in k for k in state)
    payload = sum(t.numel() * t.element_size() for t in state.values())
    expected = len(to_bytes(Message(state)))
    assert history[-1].bytes_down_per_client == expected
    assert payload < history[-1].bytes_up_per_client < payload + 4096  # payload + header + meta
    assert len(history[-1].clients) == 2
    assert (tmp_path / "global.safetensors").is_file()


def test_same_seed_same_global_state(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    s1 = run(tiny_model_dir, clients, rounds=2)[3]
    s2 = run(tiny_model_dir, clients, rounds=2)[3]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_training_lowers_the_loss_on_client_data(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    prompts = [p for c in clients for p in c.prompts]
    labels = [y for c in clients for y in c.targets]
    method, model, tok, state, _ = run(tiny_model_dir, clients, rounds=6)
    with torch.no_grad():
        trained = method.loss(model, prompts, labels).item()
        with model.disable_adapter():
            untrained = method.loss(model, prompts, labels).item()
    assert trained < untrained - 0.02


def test_export_writes_a_loadable_merged_model(tiny_model_dir, sst2_prompts, tmp_path):
    method, model, tok, state, _ = run(tiny_model_dir, make_clients(sst2_prompts), rounds=1)
    method.apply_global(model, state)  # the global adapter, not the last client's
    batch = encode(tok, ["Review: good\nSentiment:"], 32)
    with torch.no_grad():
        expected = model(**batch).logits
    method.export(model, state, tmp_path)
    merged, _ = load_hf(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def drift(state, start) -> float:
    return sum(((state[k] - start[k]) ** 2).sum().item() for k in state) ** 0.5


def test_fedprox_term_keeps_clients_near_the_global_model(tiny_model_dir, sst2_prompts):
    """finetune.proximal_mu (FedProx): the same round with a large mu moves the global LoRA
    blocks less; the reported loss stays the task loss (the term is zero at the first step)."""
    clients = make_clients(sst2_prompts)
    plain, _, _, state, history = run(tiny_model_dir, clients, rounds=1)
    prox, _, _, prox_state, prox_history = run(tiny_model_dir, clients, rounds=1, proximal_mu=100.0)
    assert 0 < drift(prox_state, prox.initial) < 0.8 * drift(state, plain.initial)
    assert abs(prox_history[0].train_loss - history[0].train_loss) < 0.5


def test_fedprox_is_for_backprop_methods_and_off_leaves_resume_keys_as_they_were():
    with pytest.raises(ValueError, match="finetune.proximal_mu: .*fedkseed trains by zeroth order"):
        FinetuneParams(method="fedkseed", proximal_mu=0.1)
    assert "proximal_mu" not in FinetuneParams().training_key()  # runs cached before the knob resume
    assert FinetuneParams(proximal_mu=0.1).training_key()["proximal_mu"] == 0.1


def test_local_sgd_steps_by_the_gradient_of_the_clients_batch(tiny_model_dir, sst2_prompts):
    """finetune.client_optimizer sgd: one local step is w - lr * grad of the task loss on the batch
    the client's generator draws (plain SGD, FedAvg's local solver), not AdamW's normalized step."""
    from edgetune.federated.engine import client_generator
    from tests.helpers import batch_gradients, build, noisy_lora_state

    client = make_clients(sst2_prompts)[0]
    cfg = FinetuneParams(local_steps=1, batch_size=8, lr=0.5, client_optimizer="sgd")
    method, model = build(tiny_model_dir, cfg)
    state = noisy_lora_state(method, model)
    reply = method.client_update(model, Message(state), client, client_generator(0, 1, 0))
    grads = batch_gradients(method, model, state, client, client_generator(0, 1, 0))
    for (key, p), g in zip(method.blocks.items(), grads):
        torch.testing.assert_close(reply.tensors[key], state[key] - 0.5 * g, atol=1e-6, rtol=1e-5)
    adamw = FinetuneParams(local_steps=1, batch_size=8, lr=0.5)
    adam_method, adam_model = build(tiny_model_dir, adamw)
    adam_reply = adam_method.client_update(adam_model, Message(state), client, client_generator(0, 1, 0))
    assert drift(adam_reply.tensors, state) > 2 * drift(reply.tensors, state)  # ~lr per coordinate


def test_local_sgd_needs_an_lr_and_a_backprop_method_and_adamw_keeps_resume_keys():
    with pytest.raises(ValueError, match="finetune.lr: auto stands for the method's AdamW lr"):
        FinetuneParams(client_optimizer="sgd")
    with pytest.raises(ValueError, match="finetune.client_optimizer: fedkseed trains by zeroth order"):
        FinetuneParams(method="fedkseed", client_optimizer="sgd", lr=0.1)
    assert "client_optimizer" not in FinetuneParams().training_key()  # runs cached before the knob resume
    assert FinetuneParams(client_optimizer="sgd", lr=0.1).training_key()["client_optimizer"] == "sgd"
