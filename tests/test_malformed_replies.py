"""Malformed replies never reach the model (issue 23): the server rejects a reply with
unexpected tensors, wrong shapes or dtypes, NaN, impossible seeds or an oversized payload
before aggregation, logs the client and reason, meters its bytes, and the round goes on with
the others — exactly as if that client had failed. (Flower: tests/test_flower.py.)"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from edgetune.config import FinetuneParams
from edgetune.federated import validation
from edgetune.federated.attacks import malicious_clients
from edgetune.federated.protocol import Message
from tests.helpers import federate, make_clients

ATTACK = {"fraction": 0.25}  # 1 of 4 clients


def params(name: str, kind: str = "none") -> FinetuneParams:
    return FinetuneParams(method=name, num_rounds=2, sample_rate=1.0, local_steps=2, batch_size=4, lr=5e-3,
                          trainable="lora" if name == "fedkseed" else "auto", zo={"K": 16},
                          attack={**ATTACK, "kind": kind})


def fails(client_id: int):
    """A patch making `client_id`'s local work raise (the engine drops a failed client)."""
    def patch(method):
        honest = method.client_update

        def client_update(model, down, data, rng):
            if data.client_id == client_id:
                raise RuntimeError("client down")
            return honest(model, down, data, rng)
        method.client_update = client_update
    return patch


@pytest.mark.parametrize("name, kind", [
    ("fedit", "nan"), ("fedit", "wrong_shape"), ("fedit", "unknown_tensor"), ("fedit", "oversized"),
    ("fedkseed", "nan"), ("fedkseed", "bad_seed"), ("fedkseed", "oversized"),
    ("job", "bad_seed"), ("job", "replayed_seeds"), ("fwdllm", "wrong_shape"),
])
def test_a_malformed_reply_is_rejected_and_the_round_goes_on_without_it(tiny_model_dir, sst2_prompts,
                                                                        name, kind, caplog):
    clients = make_clients(sst2_prompts, n=4, size=16)
    (attacker,) = malicious_clients(ATTACK["fraction"], 4, 0)
    with caplog.at_level(logging.WARNING, logger="edgetune.federated.engine"):
        *_, state, history = federate(tiny_model_dir, clients, params(name, kind))
    # replayed_seeds replies honestly the first time the client is sampled
    rejected_rounds = history[1:] if kind == "replayed_seeds" else history
    assert all(h.rejected == [attacker] and attacker not in h.clients for h in rejected_rounds)
    assert all(len(h.clients) == 4 - len(h.rejected) for h in history)
    assert f"reply of client {attacker} rejected" in caplog.text
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    # exactly the model of a round where that client had failed
    *_, failed_state, _ = federate(tiny_model_dir, clients, params(name), patch=fails(attacker)) \
        if kind != "replayed_seeds" else (None, None, None, None)
    if failed_state is not None:
        assert state.keys() == failed_state.keys() and all(torch.equal(state[k], failed_state[k]) for k in state)
    if kind == "oversized":  # its bytes are metered as sent
        *_, clean = federate(tiny_model_dir, clients, params(name))
        assert history[0].bytes_exchanged > clean[0].bytes_exchanged


def test_honest_replies_of_every_method_pass(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts, n=2, size=16)
    for name in ("fedit", "fedbitfit", "fedprompt", "fedselft", "fedpeptao", "fedkseed", "fedkseed-pro",
                 "job", "fwdllm"):
        cfg = FinetuneParams(method=name, num_rounds=2, sample_rate=1.0, local_steps=1, batch_size=2,
                             zo={"K": 8}, selft={"strategy": "gradient-variance", "layers": 1})
        *_, history = federate(tiny_model_dir, clients, cfg)
        assert [h.rejected for h in history] == [[], []], name


@pytest.mark.parametrize("meta, why", [
    ({"num_samples": 0, "loss": 0.5}, "num_samples is 0"),
    ({"num_samples": 3.5, "loss": 0.5}, "num_samples is 3.5"),
    ({"num_samples": 3, "loss": math.nan}, "loss is nan"),
    ({"num_samples": 3}, "loss is None"),
])
def test_reply_meta_must_be_a_sample_count_and_a_finite_loss(meta, why):
    reply = Message({"w": torch.zeros(2)}, meta)
    assert why in validation.reply_problem(reply, {"w": ((2,), torch.float32)})


def test_reply_tensors_are_checked_by_name_dtype_shape_and_value():
    expected = {"w": ((2, 2), torch.float32), "side": (None, None)}
    ok = {"num_samples": 1, "loss": 0.1}
    check = lambda tensors, required=("w",): validation.reply_problem(Message(tensors, ok), expected, required)  # noqa: E731
    assert check({"w": torch.zeros(2, 2)}) is None
    assert check({"w": torch.zeros(2, 2), "side": torch.ones(5, dtype=torch.bfloat16)}) is None
    assert "missing tensors ['w']" in check({"side": torch.ones(3)})
    assert "unexpected tensors ['x']" in check({"w": torch.zeros(2, 2), "x": torch.zeros(1)})
    assert "dtype torch.float64" in check({"w": torch.zeros(2, 2, dtype=torch.float64)})
    assert "shape (4,)" in check({"w": torch.zeros(4)})
    assert "NaN or Inf" in check({"w": torch.tensor([[0.0, math.inf], [0.0, 0.0]])})
    assert "at most" in check({"w": torch.zeros(2, 2), "side": torch.zeros(validation.MAX_SIDE_ELEMENTS + 1)})
    assert "floating dtype" in check({"w": torch.zeros(2, 2), "side": torch.zeros(3, dtype=torch.int64)})


def test_bad_seed_attack_needs_a_seed_scalar_method():
    with pytest.raises(ValueError, match="finetune.attack.kind: bad_seed corrupts seeds, but fedit sends weights"):
        FinetuneParams(method="fedit", attack={"fraction": 0.5, "kind": "bad_seed"})
