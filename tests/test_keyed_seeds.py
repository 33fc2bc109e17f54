"""Keyed seeds (issue 23): with finetune.zo.secret, the holder of the federation key replays
an exchanged seed-scalar dictionary bit-identically; without the key (an eavesdropper holding
the messages and the public base model) or with another key, the replayed update points in a
direction unrelated to the fine-tuning, and a party holding another key stops instead."""

from __future__ import annotations

import pytest
import torch

from edgetune.config import FinetuneParams, RunFailed
from edgetune.federated import keys, zo
from edgetune.models import load_hf
from tests.helpers import build, federate, make_clients
from tests.rebuild_from_checkpoint import weights_hash


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "federation.key"
    path.write_text("3f1c" * 16 + "\n")  # 64 hex characters, 512 bits
    return path


def test_a_key_changes_every_z_and_the_same_key_repeats_it(key_file, tmp_path):
    other = tmp_path / "other.key"
    other.write_text("a" * 32)
    params = [torch.zeros(3000)]
    for generator in zo.GENERATORS:
        plain = zo.Sampler(generator)
        keyed = zo.Sampler(generator, key=keys.read_key(f"file:{key_file}"))
        z = {name: zo.materialize(params, 7, s) for name, s in
             [("plain", plain), ("keyed", keyed), ("again", zo.Sampler(generator, key=keyed.key)),
              ("other", zo.Sampler(generator, key=keys.read_key(f"file:{other}")))]}
        assert torch.equal(z["keyed"], z["again"])
        assert not torch.equal(z["keyed"], z["plain"]) and not torch.equal(z["keyed"], z["other"])
        assert abs(torch.nn.functional.cosine_similarity(z["keyed"], z["plain"], dim=0)) < 0.1
    assert "+key:" in keyed.tag and "3f1c" not in keyed.tag and "3f1c" not in repr(keyed)


def replayed_update(model_dir, cfg: FinetuneParams, state, base) -> list[torch.Tensor]:
    """What a party replaying the checkpointed dictionary onto the base model gets, minus the
    base weights."""
    method, _ = build(model_dir, cfg)
    method.rebuild(None, state)
    return [p.detach() - b for p, b in zip(method.params, base)]


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_the_key_holder_replays_bit_identically_and_nobody_else_learns_anything(
        tiny_model_dir, sst2_prompts, key_file, tmp_path):
    from edgetune.federated.protocol import from_bytes

    other = tmp_path / "other.key"
    other.write_text("b" * 40)
    common = dict(method="fedkseed", num_rounds=3, sample_rate=0.5, local_steps=3, batch_size=8,
                  trainable="lora")
    zo_knobs = {"K": 64, "lr": 1e-3}
    cfg = FinetuneParams(**common, zo={**zo_knobs, "secret": f"file:{key_file}"})
    method, model, _, _ = federate(tiny_model_dir, make_clients(sst2_prompts), cfg, checkpoint_dir=tmp_path)
    state = from_bytes((tmp_path / "global.safetensors").read_bytes()).tensors
    fresh, _ = build(tiny_model_dir, cfg)
    base = [p.detach().clone() for p in fresh.params]
    owner = replayed_update(tiny_model_dir, cfg, state, base)
    again = replayed_update(tiny_model_dir, cfg, state, base)
    assert weights_hash(owner) == weights_hash(again) and sum(t.norm() for t in owner) > 0

    no_key = replayed_update(tiny_model_dir, FinetuneParams(**common, zo=zo_knobs), state, base)
    wrong_cfg = FinetuneParams(**common, zo={**zo_knobs, "secret": f"file:{other}"})
    wrong = replayed_update(tiny_model_dir, wrong_cfg, state, base)
    for stolen in (no_key, wrong):
        # the same scalars along unrelated directions: as long, and orthogonal to the real update
        assert abs(cosine(stolen, owner)) < 0.05
        ratio = torch.cat([t.flatten() for t in stolen]).norm() / torch.cat([t.flatten() for t in owner]).norm()
        assert 0.8 < ratio < 1.25
    wrong_method, _ = build(tiny_model_dir, wrong_cfg)
    with pytest.raises(RunFailed, match=r"\+key:"):
        wrong_method.check(method.sampler.tag, "the checkpoint")


@pytest.mark.parametrize("secret, expected", [
    ("file:{tmp}/missing.key", "cannot read it"),
    ("file:{tmp}/short.key", "holds 64 bits; a federation key needs at least 128"),
    ("env:EDGETUNE_TEST_NO_SUCH_KEY", "'EDGETUNE_TEST_NO_SUCH_KEY' is not set"),
    ("3f1c3f1c3f1c3f1c3f1c3f1c3f1c3f1c", "expected 'file:PATH' or 'env:NAME'"),
])
def test_a_bad_key_reference_names_the_key_and_not_its_value(tmp_path, secret, expected):
    from edgetune.config import ParamsError, parse_params

    (tmp_path / "short.key").write_text("12345678")
    with pytest.raises(ParamsError) as err:
        parse_params({"finetune": {"method": "fedkseed", "zo": {"secret": secret.format(tmp=tmp_path)}}})
    assert "finetune.zo.secret" in str(err.value) and expected in str(err.value)
    assert "12345678" not in str(err.value)


# --------------------------------------------------------------------------- authenticated messages
def keyed(key_file, name="fedkseed", kind="none", rounds=2) -> FinetuneParams:
    return FinetuneParams(method=name, num_rounds=rounds, sample_rate=1.0, local_steps=2, batch_size=4,
                          trainable="lora", zo={"K": 16, "lr": 1e-3, "secret": f"file:{key_file}" if key_file else None},
                          attack={"fraction": 0.25, "kind": kind})


def test_every_seed_scalar_message_is_sealed_and_the_mac_costs_a_few_dozen_bytes(tiny_model_dir, sst2_prompts,
                                                                                   key_file):
    from edgetune.federated.protocol import to_bytes

    clients = make_clients(sst2_prompts, n=4, size=16)
    for name in ("fedkseed", "job"):
        method, *_, history = federate(tiny_model_dir, clients, keyed(key_file, name))
        assert [h.rejected for h in history] == [[], []]
        plain, *_, plain_history = federate(tiny_model_dir, clients, keyed(None, name))
        state = method.init_state(None)
        down = method.downlink(state)
        assert len(down.meta["mac"]) == 2 * keys.MAC_BYTES
        assert keys.mac_problem(method.sampler.key, 0, down.tensors, down.meta) is None
        # bytes added per reply: the tag and the sampler's fingerprint in the JSON header
        extra = history[-1].bytes_up_per_client - plain_history[-1].bytes_up_per_client
        assert 32 <= extra <= 128, extra
        assert len(to_bytes(down)) - len(to_bytes(plain.downlink(plain.init_state(None)))) <= 128


@pytest.mark.parametrize("name, kind", [("fedkseed", "tampered"), ("job", "tampered"), ("fedkseed", "replayed_seeds")])
def test_with_a_key_tampered_and_replayed_replies_are_rejected(tiny_model_dir, sst2_prompts, key_file, name, kind):
    clients = make_clients(sst2_prompts, n=4, size=16)
    *_, history = federate(tiny_model_dir, clients, keyed(key_file, name, kind, rounds=3))
    expected = [[0]] * 3 if kind == "tampered" else [[], [0], [0]]  # a replay needs an earlier round
    assert [h.rejected for h in history] == expected
    *_, open_history = federate(tiny_model_dir, clients, keyed(None, name, kind, rounds=3))
    assert all(h.rejected == [] for h in open_history)  # well-formed: without a MAC it gets through


def test_a_client_refuses_a_tampered_broadcast(tiny_model_dir, sst2_prompts, key_file):
    from edgetune.federated.engine import client_generator

    clients = make_clients(sst2_prompts, n=2, size=16)
    method, model, state, _ = federate(tiny_model_dir, clients, keyed(key_file, rounds=1))
    down = method.downlink(state)
    down.tensors["scalars"] = down.tensors["scalars"].clone()
    down.tensors["scalars"][0] += 1.0
    with pytest.raises(RunFailed, match="broadcast of round 1 is refused: MAC does not match"):
        method.client_update(model, down, clients[0], client_generator(0, 2, 0))


def test_the_mac_reads_tensors_as_any_transport_delivers_them(key_file):
    """Flower hands tensors over from numpy: empty ones with a 0 stride, others non-contiguous."""
    import numpy as np

    key = keys.read_key(f"file:{key_file}")
    plain = {"scalars": torch.zeros(0), "grads": torch.arange(6.0).reshape(2, 3)}
    odd = {"scalars": torch.from_numpy(np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (0,), (0,))),
           "grads": plain["grads"].t().contiguous().t()}  # same values, column-major
    assert not odd["grads"].is_contiguous()
    meta = {"round": 1}
    assert keys.message_mac(key, 1, plain, meta) == keys.message_mac(key, 1, odd, meta)
    assert keys.message_mac(key, 1, plain, meta) != keys.message_mac(key, 2, plain, meta)
