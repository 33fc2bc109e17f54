"""Quantization steps."""

from __future__ import annotations

from pathlib import Path


def int8_weight_only(src: Path, dst: Path, step, ctx=None) -> dict:
    """int8 weight-only quantization of all Linear layers with torchao (per-channel symmetric
    scales, activations stay float): ~4x smaller Linear weights, CPU-friendly. Saved through
    transformers' TorchAoConfig, so the folder reloads with a plain from_pretrained()."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    from edgetune.models import save_tokenizer

    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    model.save_pretrained(dst)
    save_tokenizer(AutoTokenizer.from_pretrained(src), dst)
    return {"bits": 8}
