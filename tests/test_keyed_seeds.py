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
