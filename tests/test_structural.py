"""Structural (LLM-Pruner-style) pruning: MLP channels removed uniformly, Taylor scores from
calibration gradients, LoRA recovery lowers the task loss, and the folder reloads anywhere."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import edgetune.models
from edgetune.compress import CompressContext
from edgetune.compress.structural import structural_prune
from edgetune.config import BadInput, StructuralStep
from edgetune.models import count_parameters, load_hf
from edgetune.scoring import classification_loss, encode, label_token_ids
from edgetune.tasks import get_task
from tests.conftest import REPO

# The tiny model: 3.2M parameters, 2.5M of them the tied 49k x 64 embedding; one MLP channel is
# 3 x 64 weights x 2 layers = 384 parameters, so 0.0075 of the model is ~63 channels per layer,
# rounded to 64 of 128.
RATIO = 0.0075
CHANNELS = 64
TRAIN_ROWS = 16


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, mirror, sst2_prompts, tokenizer_dir) -> CompressContext:
    """8 x 32 tokens of real WikiText-2 for calibration; 16 real SST-2 rows as the train split."""
    from transformers import AutoTokenizer

    text = (mirror / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:20_000]
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(text).input_ids
    data = tmp_path_factory.mktemp("data")
    prompts, labels = sst2_prompts
    pd.DataFrame({"prompt": prompts[:TRAIN_ROWS], "label": labels[:TRAIN_ROWS]}).to_parquet(
        data / "train.parquet")
    return CompressContext(calibration=[ids[i * 32:(i + 1) * 32] for i in range(8)], data_dir=data)


def prune(tiny_model_dir, ctx, out, **options) -> dict:
    step = StructuralStep(ratio=RATIO, **options)
    return structural_prune(tiny_model_dir, out, step, ctx)


@pytest.fixture(scope="module")
def recovered(tiny_model_dir, ctx, tmp_path_factory):
    out = tmp_path_factory.mktemp("recovered")
    return out, prune(tiny_model_dir, ctx, out, recovery_steps=10)


@pytest.fixture(scope="module")
def unrecovered(tiny_model_dir, ctx, tmp_path_factory):
    out = tmp_path_factory.mktemp("taylor")
    return out, prune(tiny_model_dir, ctx, out, recovery_steps=0)


def test_removes_the_ratio_as_whole_mlp_channels(recovered):
    out, info = recovered
    model, _ = load_hf(out)
    assert model.config.intermediate_size == info["intermediate_size"] == 128 - CHANNELS
    assert info["params_before"] - count_parameters(model) == CHANNELS * 384
    # Whole channels, rounded to a multiple of 8 only when that moves the count by <= 5%.
    assert info["params_removed_share"] == pytest.approx(RATIO, rel=0.05)
    assert all(layer.self_attn.q_proj.out_features == 64 for layer in model.model.layers)


def test_reloads_in_a_fresh_process_with_the_same_logits(recovered, tmp_path):
    out, _ = recovered
    model, tok = load_hf(out)
    ids = tok("Review: a fine film\nSentiment:", return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as M; "
            "m = M.from_pretrained(sys.argv[1]).eval(); "
            "torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])")
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "logits.pt"), model(ids).logits, atol=1e-5)


def kept_channels(tiny_model_dir, out) -> list[set[int]]:
    """Per layer, which original gate_proj rows the pruned model kept (pruning copies rows)."""
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    kept = []
    for i in range(2):
        key = f"model.layers.{i}.mlp.gate_proj.weight"
        match = (after[key][:, None, :] == before[key][None, :, :]).all(-1).nonzero()
        kept.append(set(match[:, 1].tolist()))
    return kept


def test_taylor_keeps_other_channels_than_magnitude(tiny_model_dir, ctx, unrecovered, tmp_path):
    prune(tiny_model_dir, ctx, tmp_path / "magnitude", importance="magnitude", recovery_steps=0)
    taylor = kept_channels(tiny_model_dir, unrecovered[0])
    magnitude = kept_channels(tiny_model_dir, tmp_path / "magnitude")
    assert all(len(k) == 128 - CHANNELS for k in taylor + magnitude)
    assert taylor != magnitude


def test_recovery_lowers_the_classification_loss(recovered, unrecovered, sst2_prompts):
    prompts, labels = sst2_prompts

    def loss(out):
        model, tok = load_hf(out)
        label_ids = label_token_ids(tok, get_task("sst2").label_words)
        with torch.no_grad():
            batch = encode(tok, prompts[:TRAIN_ROWS], 64)
            return classification_loss(model, batch, torch.tensor(labels[:TRAIN_ROWS]), label_ids).item()

    assert loss(recovered[0]) < loss(unrecovered[0]) - 0.05


def test_same_seed_gives_identical_weights(tiny_model_dir, ctx, recovered, tmp_path):
    prune(tiny_model_dir, ctx, tmp_path / "again", recovery_steps=10)
    first = load_file(recovered[0] / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_unreachable_ratio_fails_before_loading(tiny_model_dir, ctx, tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("model loaded before the ratio was checked")

    monkeypatch.setattr(edgetune.models, "load_hf", must_not_load)
    with pytest.raises(BadInput, match="structural ratio 0.5"):
        structural_prune(tiny_model_dir, tmp_path / "x", StructuralStep(ratio=0.5), ctx)
