"""Export to llama.cpp (issue 21): the GGUF files the export stage writes open in llama.cpp,
tokenize as transformers does, and score as the torch model does; quantized torch folders are
dequantized first; a failed export leaves nothing for DVC to take."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="pip install 'edgetune[deploy]' (make setup-dev installs it)")

from edgetune.export import llamacpp  # noqa: E402
from edgetune.export.gguf import export_gguf, float_copy  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "exported"
    return out, export_gguf(tiny_model_dir, ["gguf-f16", "gguf-q8_0"], out, threads=2)


@pytest.fixture(scope="module")
def torch_model(tiny_model_dir):
    from edgetune.models import load_hf

    return load_hf(tiny_model_dir)


def test_gguf_files_are_llama_models_with_smollm2s_tokenizer(exported, torch_model):
    from gguf import GGUFReader

    out, records = exported
    assert set(records) == {"gguf-f16", "gguf-q8_0"}
    assert records["gguf-q8_0"]["size_mb"] < 0.7 * records["gguf-f16"]["size_mb"]  # 8.5 vs 16 bits, f32 norms aside
    fields = GGUFReader(str(out / "gguf-q8_0" / "model.gguf")).fields
    value = {k: fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.model",
                                               "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id")}
    model, _ = torch_model
    assert value == {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
                     "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.eos_token_id": model.generation_config.eos_token_id}


def test_llama_cpp_tokenizes_real_prompts_as_transformers(exported, torch_model, sst2_prompts):
    _, tok = torch_model
    llm = llamacpp.open_gguf(exported[0] / "gguf-f16" / "model.gguf", 256, 2)
    prompts = sst2_prompts[0][:100] + ["<|im_start|>user\nWie geht's? — ünïcode 123<|im_end|>\n"]
    for prompt in prompts:
        assert llamacpp.tokens(llm, prompt) == tok(prompt).input_ids, prompt


def test_llama_cpp_logits_and_perplexity_match_torch(exported, torch_model, sst2_prompts):
    """The f16 file's next-token logits track the fp32 torch model's (f16 rounding only), and
    its perplexity on the same windows is the torch perplexity to within 1%."""
    import torch

    from edgetune.evaluate import perplexity

    model, tok = torch_model
    path = exported[0] / "gguf-f16" / "model.gguf"
    llm = llamacpp.open_gguf(path, 256, 2)
    for prompt in sst2_prompts[0][:5]:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
        got = llamacpp.last_logits(llm, ids)
        assert np.corrcoef(ref, got)[0, 1] > 0.999
        assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max() + 1e-3
    text = " ".join(sst2_prompts[0][:200])
    ours = llamacpp.perplexity(path, text, 4, 64, 2)
    theirs = perplexity(model, tok, text, 4, 64)
    assert math.isfinite(ours) and abs(ours / theirs - 1) < 0.01, (ours, theirs)


def test_a_torchao_int8_folder_is_dequantized_for_the_converter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from edgetune.compress.quantize import int8_weight_only

    int8_weight_only(tiny_model_dir, tmp_path / "int8", step=None)
    changes = float_copy(tmp_path / "int8", tmp_path / "float")
    assert changes["source_quantization"] == "torchao"
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "float" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert after[name].dtype == before[name].dtype
    error = (after[name] - before[name]).abs().max() / before[name].abs().max()
    assert 0 < error < 1 / 127  # int8 rounding, within one step of the per-channel grid


def test_a_failed_export_leaves_no_output(tiny_model_dir, tmp_path, monkeypatch):
    from edgetune.config import RunFailed
    from edgetune.export import gguf

    def broken(folder, out_file):
        out_file.write_bytes(b"half a file")
        raise RunFailed("converter died")

    monkeypatch.setattr(gguf, "convert", broken)
    with pytest.raises(RunFailed, match="converter died"):
        export_gguf(tiny_model_dir, ["gguf-q4_0"], tmp_path / "exported", threads=1)
    assert list(tmp_path.iterdir()) == []


def test_pruned_widths_and_fewer_layers_export_and_run(tokenizer_dir, tmp_path, sst2_prompts):
    """What structural pruning and a GKD student leave: an MLP width that is a multiple of 8
    but not of llama.cpp's 32-blocks (104), one layer. It converts and quantizes (llama.cpp falls
    back to a type that fits those rows) and scores close to the float file."""
    import json

    from tests.conftest import save_tiny_llama

    folder = save_tiny_llama(tokenizer_dir, tmp_path / "pruned", num_layers=1)
    config = json.loads((folder / "config.json").read_text())
    assert config["intermediate_size"] == 128
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    keep = list(range(104))  # the first 104 MLP channels, as a pruner that kept them would
    for layer in model.model.layers:
        mlp = layer.mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight.data = proj.weight.data[keep].clone()
            proj.out_features = len(keep)
        mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, keep].clone()
        mlp.down_proj.in_features = len(keep)
    model.config.intermediate_size = len(keep)
    model.save_pretrained(folder)
    records = export_gguf(folder, ["gguf-f16", "gguf-q4_0"], tmp_path / "exported", threads=1)
    ids_of = [llamacpp.tokens(llamacpp.open_gguf(tmp_path / "exported" / "gguf-f16" / "model.gguf", 128, 1), p)
              for p in sst2_prompts[0][:3]]
    for fmt in records:
        llm = llamacpp.open_gguf(tmp_path / "exported" / fmt / "model.gguf", 128, 1)
        logits = [llamacpp.last_logits(llm, ids) for ids in ids_of]
        assert all(np.isfinite(x).all() for x in logits)
        if fmt == "gguf-f16":
            reference = logits
    assert all(np.corrcoef(a, b)[0, 1] > 0.9 for a, b in zip(reference, logits))


def test_a_gguf_row_reports_the_torch_rows_classification_metrics(exported, sst2_prompts, tmp_path):
    """score_isolated (the evaluate stage's GGUF row, in a process of its own) reports accuracy,
    macro-F1 and the predicted label shares from llama.cpp's own predictions."""
    import pandas as pd

    from edgetune.config import EvaluateParams
    from edgetune.scoring import classification_metrics

    prompts, labels = sst2_prompts[0][:24], sst2_prompts[1][:24]
    pd.DataFrame({"prompt": prompts, "label": labels}).to_parquet(tmp_path / "eval.parquet")
    (tmp_path / "wikitext2_test.txt").write_text(" ".join(sst2_prompts[0][100:200]))
    path = exported[0] / "gguf-f16" / "model.gguf"
    cfg = EvaluateParams(ppl_windows=1, ppl_seq_len=64, latency_new_tokens=2)
    row = llamacpp.score_isolated(str(path), str(tmp_path), "sst2", cfg, "gguf-f16")
    llm = llamacpp.open_gguf(path, 256, 1)
    predictions = llamacpp.label_predictions(llm, prompts, (" negative", " positive"), 128, "check")
    expected = classification_metrics(predictions, labels, (" negative", " positive"))
    assert {k: row[k] for k in expected} == expected
    assert row["score"] == row["accuracy"] and row["eval_examples"] == 24 and row["peak_rss_mb"] > 0
