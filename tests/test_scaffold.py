"""SCAFFOLD (finetune.scaffold, edgetune/federated/scaffold.py) on a tiny Llama with real SST-2
rows: the corrected local step, option II's control variates, the bytes, and the refusals."""

from __future__ import annotations

import pytest
import torch

from edgetune.config import FinetuneParams
from edgetune.federated.engine import client_generator
from edgetune.federated.protocol import Message, to_bytes
from tests.helpers import batch_gradients, build, federate, make_clients, noisy_lora_state


def test_a_local_sgd_step_is_corrected_by_c_minus_c_i(tiny_model_dir, sst2_prompts):
    """With plain SGD one corrected step is w - lr * (grad + c - c_i), the paper's local step."""
    client = make_clients(sst2_prompts)[1]
    cfg = FinetuneParams(local_steps=1, batch_size=8, lr=0.5, client_optimizer="sgd", scaffold=True)
    method, model = build(tiny_model_dir, cfg, num_clients=4)
    state = noisy_lora_state(method, model)
    method.scaffold.server = {k: torch.randn(v.shape) for k, v in state.items()}
    method.scaffold.clients[1] = {k: torch.randn(v.shape) for k, v in state.items()}
    down = Message({**state, **method.personal(1).tensors})
    reply = method.client_update(model, down, client, client_generator(0, 1, 1))
    grads = batch_gradients(method, model, state, client, client_generator(0, 1, 1))
    for (key, p), g in zip(method.blocks.items(), grads):
        c, c_i = method.scaffold.server[key], method.scaffold.clients[1][key]
        torch.testing.assert_close(reply.tensors[key], state[key] - 0.5 * (g + c - c_i), atol=1e-6, rtol=1e-5)


def record_replies(method):
    """Wrap method.aggregate to keep each round's (start state, replies)."""
    seen, aggregate = [], method.aggregate

    def recording(state, replies):
        seen.append(({k: v.clone() for k, v in state.items()}, replies))
        return aggregate(state, replies)

    method.aggregate, method.seen = recording, seen


def test_control_variates_follow_option_two_and_c_stays_the_mean_of_every_c_i(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    cfg = FinetuneParams(num_rounds=3, sample_rate=0.5, local_steps=2, batch_size=4, lr=5e-3, scaffold=True)
    method, _, _, history = federate(tiny_model_dir, clients, cfg, patch=record_replies)
    cv = method.scaffold
    # the first round starts from c = c_i = 0, so c_i+ = (x - y_i) / (K lr) for each replying client
    start, replies = method.seen[0]
    first = {int(r.meta["client_id"]): (start, r) for r in replies}
    assert sorted(first) == history[0].clients
    # every client's c_i moved only in rounds it took part in; c is (1/N) * the sum of all c_i
    for key in cv.server:
        total = sum(cv.clients[i][key] for i in cv.clients)
        torch.testing.assert_close(cv.server[key], total / len(clients), atol=1e-6, rtol=1e-5)
    taken_part = {c for h in history for c in h.clients}
    assert set(cv.clients) == taken_part
    only_first = [c for c in history[0].clients if all(c not in h.clients for h in history[1:])]
    assert only_first, "the seed samples no client in round 1 only; pick another"
    for cid in only_first:
        x, y = first[cid]
        for key in x:
            expected = (x[key] - y.tensors[key]) / (cfg.local_steps * cfg.client_lr)
            torch.testing.assert_close(cv.clients[cid][key], expected, atol=1e-5, rtol=1e-5)


def test_scaffold_doubles_the_download_not_the_upload_and_changes_training(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    cfg = FinetuneParams(num_rounds=2, sample_rate=0.5, local_steps=2, batch_size=4, lr=5e-3)
    _, _, plain_state, plain = federate(tiny_model_dir, clients, cfg)
    scaffold = cfg.model_copy(update={"scaffold": True})
    _, _, state, history = federate(tiny_model_dir, clients, scaffold)
    broadcast = len(to_bytes(Message(plain_state)))
    for a, b in zip(plain, history):
        assert abs(b.bytes_up_per_client - a.bytes_up_per_client) < 32  # the loss's digits in meta
        assert 2 * broadcast - 64 < b.bytes_down_per_client < 2 * broadcast + 4096  # blocks + c - c_i
    # round 1's correction is zero (c = c_i = 0), so training only differs from round 2 on
    assert history[0].train_loss == plain[0].train_loss
    assert any(not torch.equal(state[k], plain_state[k]) for k in state)


@pytest.mark.parametrize("overrides, reason", [
    ({"method": "fedkseed"}, "fedkseed trains by zeroth order"),
    ({"method": "fedselft"}, "fedselft's clients train and send only some blocks"),
    ({"method": "fedpeptao"}, "fedpeptao's clients train and send only some blocks"),
    ({"dp": {"noise_multiplier": 1.0, "clip": 0.5}}, "which DP keeps from it"),
    ({"aggregation": {"rule": "median"}}, "would not keep an attacker out of them"),
])
def test_scaffold_is_refused_where_control_variates_cannot_be_kept(overrides, reason):
    with pytest.raises(ValueError, match=f"finetune.scaffold: .*{reason}"):
        FinetuneParams(scaffold=True, **overrides)


def test_scaffold_off_leaves_resume_keys_as_they_were():
    assert "scaffold" not in FinetuneParams().training_key()  # runs cached before the knob resume
    assert FinetuneParams(scaffold=True).training_key()["scaffold"] is True
