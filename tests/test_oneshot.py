"""One-shot compression (llmcompressor GPTQ / RTN / SparseGPT / Wanda, magnitude baseline):
the saved folders reload with from_pretrained, carry the promised bits or zeros, and the
calibrated methods beat their uncalibrated baselines on held-out text."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from edgetune.compress import CompressContext, apply_steps
from edgetune.config import BadInput, parse_params
from edgetune.models import decoder_linears, linear_sparsity, load_hf, weight_bits
from tests.conftest import REPO


def steps(*specs):
    return parse_params({"compress": {"steps": list(specs)}}).compress.steps


@pytest.fixture(scope="module")
def wikitext(mirror):
    return (mirror / "wikitext2" / "wiki.test.raw").read_text()[:200_000]


@pytest.fixture(scope="module")
def ctx(tiny_model_dir, wikitext):
    """32 calibration windows of 64 tokens from WikiText-2."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(wikitext[:60_000]).input_ids
    return CompressContext(calibration=[ids[i * 64:(i + 1) * 64] for i in range(32)])


@pytest.fixture(scope="module")
def held_out(tiny_model_dir, wikitext):
    """Held-out text (not in the calibration slice) and the fp32 model's logits on it."""
    model, tok = load_hf(tiny_model_dir)
    ids = tok(wikitext[100_000:110_000], return_tensors="pt").input_ids[:, :256].view(4, 64)
    with torch.no_grad():
        return ids, model(input_ids=ids).logits


def logit_error(folder, held_out) -> float:
    ids, reference = held_out
    model, _ = load_hf(folder)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(input_ids=ids).logits, reference).item()


@pytest.fixture(scope="module")
def compressed(tiny_model_dir, ctx, tmp_path_factory):
    """Each one-shot method run once on the tiny model; name -> folder."""
    specs = {
        "gptq4": {"method": "gptq", "bits": 4, "group_size": 64},
        "rtn4": {"method": "rtn", "bits": 4, "group_size": 64},
        "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
        "wanda24": {"method": "wanda", "sparsity": 0.5, "mask": "2:4"},
        "magnitude": {"method": "magnitude", "sparsity": 0.5},
    }
    root = tmp_path_factory.mktemp("oneshot")
    for name, spec in specs.items():
        apply_steps(tiny_model_dir, steps(spec), root / name, ctx)
    return {name: root / name for name in specs}


def test_gptq_stores_4_bit_weights_and_beats_round_to_nearest(compressed, held_out):
    assert weight_bits(compressed["gptq4"]) == weight_bits(compressed["rtn4"]) == 4
    gptq, rtn = logit_error(compressed["gptq4"], held_out), logit_error(compressed["rtn4"], held_out)
    assert 0 < gptq < rtn


def test_sparsegpt_beats_magnitude_at_the_same_sparsity(compressed, held_out):
    for name in ("sparsegpt", "magnitude"):
        model, _ = load_hf(compressed[name])
        assert linear_sparsity(model) == pytest.approx(0.5, abs=0.01)
    assert logit_error(compressed["sparsegpt"], held_out) < logit_error(compressed["magnitude"], held_out)


def test_two_four_masks_zero_two_of_every_four_weights(compressed):
    model, _ = load_hf(compressed["wanda24"])
    for _, linear in decoder_linears(model):
        groups = (linear.weight.detach() == 0).reshape(-1, 4).sum(1)
        assert (groups >= 2).all()


@pytest.mark.parametrize("name", ["gptq4", "wanda24"])
def test_compressed_folders_reload_in_a_fresh_process(compressed, name, held_out):
    ids, _ = held_out
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as M; "
            "m = M.from_pretrained(sys.argv[1]); ids = torch.load(sys.argv[2]); "
            "print(m(input_ids=ids).logits.sum().item())")
    torch.save(ids, compressed[name] / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", code, str(compressed[name]), str(compressed[name] / "ids.pt")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, _ = load_hf(compressed[name])
    with torch.no_grad():
        expected = model(input_ids=ids).logits.sum().item()
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-5)


def test_a_group_size_that_does_not_divide_the_model_fails_before_loading(tiny_model_dir, ctx,
                                                                         tmp_path, monkeypatch):
    import transformers

    def no_load(*a, **k):
        raise AssertionError("model loaded before the group size was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(BadInput, match="group_size 48 does not divide.*hidden_size 64"):
        apply_steps(tiny_model_dir, steps({"method": "gptq", "group_size": 48}), tmp_path / "x", ctx)
    assert not (tmp_path / "x").exists()


def test_two_four_needs_half_sparsity():
    with pytest.raises(BadInput, match="2:4.*sparsity 0.5"):
        steps({"method": "sparsegpt", "mask": "2:4", "sparsity": 0.6})
