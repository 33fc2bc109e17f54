"""Compression steps write HF folders that reload in a fresh process and stay close to fp32."""

from __future__ import annotations

import subprocess
import sys

import torch

from edgetune.compress import apply_steps
from edgetune.config import Int8Step
from edgetune.models import dir_size_bytes, load_hf
from edgetune.scoring import encode
from tests.conftest import REPO


def test_int8_is_smaller_close_and_reloads_in_a_fresh_process(tiny_model_dir, tmp_path):
    out = tmp_path / "int8"
    records = apply_steps(tiny_model_dir, [Int8Step()], out)
    assert records == [{"method": "int8"}]
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        int8 = [k for k in f.keys() if f.get_slice(k).get_dtype() == "I8" and "qdata" in k]
    assert len(int8) == 2 * 7  # every decoder Linear (q, k, v, o, gate, up, down) x 2 layers
    assert dir_size_bytes(out) < dir_size_bytes(tiny_model_dir)

    fp32, tok = load_hf(tiny_model_dir)
    q8, _ = load_hf(out)
    batch = encode(tok, ["Review: a fine film\nSentiment:"], 32)
    with torch.no_grad():
        a, b = fp32(**batch).logits.flatten(), q8(**batch).logits.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99

    code = ("import sys, torch; from transformers import AutoModelForCausalLM as M; "
            "m = M.from_pretrained(sys.argv[1]); "
            "print(type(m.model.layers[0].self_attn.q_proj.weight).__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Int8" in proc.stdout


def test_no_steps_copies_the_model(tiny_model_dir, tmp_path):
    apply_steps(tiny_model_dir, [], tmp_path / "copy")
    assert (tmp_path / "copy" / "config.json").is_file()
