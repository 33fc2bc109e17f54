"""One-shot compression with llmcompressor: GPTQ and round-to-nearest weight quantization,
SparseGPT and Wanda pruning (unstructured or 2:4); magnitude pruning as the baseline.

llmcompressor applies each method as a modifier over calibration batches (GPTQ: Frantar et al.,
ICLR 2023; SparseGPT: Frantar & Alistarh, ICML 2023; Wanda: Sun et al., ICLR 2024) and saves
the result in the compressed-tensors format, which transformers reloads with a plain
`from_pretrained` (packed int4/int8 weights with their scales; sparse weights as bitmasks, so
50% sparsity is also smaller on disk). Magnitude pruning uses torch.nn.utils.prune.

edgetune's part: the calibration tokens come from the `calibrate` stage, and the quantization
group size is checked against the model's widths before any weight is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from edgetune.config import BadInput

# llmcompressor logs INFO lines per layer; read when it is first imported (below, lazily).
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")

LINEAR_TARGETS = ["Linear"]
KEEP_FLOAT = ["lm_head"]  # tied to the embeddings in SmolLM2; quantizing it would untie them


def model_widths(src: Path) -> dict[str, int]:
    """The input widths of the model's Linear layers, from its config.json (no weights)."""
    config = json.loads((Path(src) / "config.json").read_text())
    return {k: config[k] for k in ("hidden_size", "intermediate_size") if k in config}


def check_group_size(widths: dict[str, int], step) -> None:
    """A quantization group must divide every Linear's input width (hidden, intermediate)."""
    if step.group_size is None:
        return
    bad = {k: w for k, w in widths.items() if w % step.group_size}
    if bad:
        raise BadInput(
            f"compress.steps: {step.method} group_size {step.group_size} does not divide the "
            f"model's {', '.join(f'{k} {w}' for k, w in bad.items())}; use a divisor "
            f"(e.g. 64 for SmolLM2) or null for per-channel scales"
        )


def weight_scheme(step):
    """compressed-tensors scheme: `bits`-bit integer weights, per group or per output channel."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=step.bits, type="int", symmetric=step.symmetric,
        strategy="group" if step.group_size else "channel", group_size=step.group_size,
    )
    return {"group_0": QuantizationScheme(targets=LINEAR_TARGETS, weights=weights)}


def calibration_dataset(ctx):
    """The calibrate stage's token sequences as the dataset llmcompressor iterates."""
    import datasets

    if not ctx.calibration:
        raise BadInput("compress: this step needs calibration data (the calibrate stage's output)")
    ids = [list(seq) for seq in ctx.calibration]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]})


def run_oneshot(src: Path, dst: Path, modifier, ctx, calibrate: bool = True) -> None:
    """Load `src`, apply one llmcompressor modifier (over the calibration set when it needs
    data), save the compressed-tensors folder to `dst`."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetune.models import save_tokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    kwargs = {}
    if calibrate:
        data = calibration_dataset(ctx)
        kwargs = dict(dataset=data, num_calibration_samples=len(data),
                      max_seq_length=len(data[0]["input_ids"]), shuffle_calibration_samples=False)
    oneshot(model=model, recipe=[modifier], **kwargs)
    model.save_pretrained(dst, save_compressed=True)
    save_tokenizer(tok, dst)


def gptq(src: Path, dst: Path, step, ctx) -> dict:
    """GPTQ: quantize column by column, updating the remaining columns with the inverse
    Hessian of the layer's calibration inputs to cancel the rounding error."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    check_group_size(model_widths(src), step)
    modifier = GPTQModifier(config_groups=weight_scheme(step), ignore=KEEP_FLOAT,
                            dampening_frac=step.dampening, block_size=step.block_size)
    run_oneshot(src, dst, modifier, ctx)
    return {"bits": step.bits}


def rtn(src: Path, dst: Path, step, ctx) -> dict:
    """Round-to-nearest: the same scheme as GPTQ with min-max scales and no error correction."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    check_group_size(model_widths(src), step)
    run_oneshot(src, dst, QuantizationModifier(config_groups=weight_scheme(step), ignore=KEEP_FLOAT),
                ctx, calibrate=False)
    return {"bits": step.bits}


def mask_structure(step) -> str:
    return "2:4" if step.mask == "2:4" else "0:0"  # llmcompressor: 0:0 = unstructured


def sparsegpt(src: Path, dst: Path, step, ctx) -> dict:
    """SparseGPT: choose the mask and update the kept weights by the OBS rule, layer by layer."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    modifier = SparseGPTModifier(sparsity=step.sparsity, mask_structure=mask_structure(step),
                                 dampening_frac=step.dampening, targets=["re:.*layers.*"],
                                 ignore=KEEP_FLOAT)
    run_oneshot(src, dst, modifier, ctx)
    return {"sparsity_target": step.sparsity}


def wanda(src: Path, dst: Path, step, ctx) -> dict:
    """Wanda: drop the weights with the smallest |W| x ||input activation||, per output row."""
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    modifier = WandaPruningModifier(sparsity=step.sparsity, mask_structure=mask_structure(step),
                                    targets=["re:.*layers.*"], ignore=KEEP_FLOAT)
    run_oneshot(src, dst, modifier, ctx)
    return {"sparsity_target": step.sparsity}


def magnitude_prune(src: Path, dst: Path, step, ctx) -> dict:
    """Magnitude pruning, the baseline SparseGPT and Wanda are measured against (as in their
    papers): in every decoder Linear, zero the smallest |W| of the layer (unstructured, with
    torch.nn.utils.prune), or the 2 smallest of every 4 consecutive input weights (2:4).
    No calibration data, no weight update."""
    from torch.nn.utils import prune

    from edgetune.models import load_hf, save_hf

    model, tok = load_hf(src, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            if step.mask == "2:4":
                prune.custom_from_mask(module, "weight", two_four_magnitude_mask(module.weight))
            else:
                prune.l1_unstructured(module, "weight", amount=step.sparsity)
            prune.remove(module, "weight")  # bake the zeros into the weight
    save_hf(model, tok, dst)
    return {"sparsity_target": step.sparsity}


def two_four_magnitude_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |W| of every 4 consecutive input weights of a row."""
    groups = weight.detach().abs().reshape(-1, 4)
    keep = torch.zeros_like(groups).scatter_(1, groups.topk(2, dim=1).indices, 1.0)
    return keep.reshape(weight.shape)
