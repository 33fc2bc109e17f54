"""Compression as a list of steps (llm-compressor's recipe idea): each step reads an HF folder
and writes an HF folder that `from_pretrained` reloads; `apply_steps` chains them in order.

A step is a function `(src, dst, step, ctx) -> dict`: `step` is its typed options from
`compress.steps`, `ctx` the shared inputs (calibration tokens, the task's train split), and the
returned dict holds what the step measured itself (e.g. parameters removed), logged with it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class CompressContext:
    """What steps share: calibration sequences (token ids, from the `calibrate` stage) and the
    prepared data folder (train.parquet with `prompt`, `label`) for recovery / distillation."""

    calibration: list[list[int]]
    data_dir: Path | None = None
    task: str = "sst2"


# step method name -> "module:function"; imported when a recipe uses it (llmcompressor and trl
# take seconds to import, and an int8-only recipe should not pay for them).
STEPS: dict[str, str] = {
    "int8": "edgetune.compress.quantize:int8_weight_only",
    "gptq": "edgetune.compress.oneshot:gptq",
    "rtn": "edgetune.compress.oneshot:rtn",
    "sparsegpt": "edgetune.compress.oneshot:sparsegpt",
    "wanda": "edgetune.compress.oneshot:wanda",
    "magnitude": "edgetune.compress.oneshot:magnitude_prune",
    "structural": "edgetune.compress.structural:structural_prune",
    "gkd": "edgetune.compress.distill:gkd_distill",
}


def step_function(method: str) -> Callable:
    import importlib

    module, _, name = STEPS[method].partition(":")
    return getattr(importlib.import_module(module), name)


def preflight(src: Path, steps) -> None:
    """Check every step against the model's config before any weight is loaded: a quantization
    group size must divide the widths the model will have when that step runs (a structural
    step before it narrows the MLP), a structural ratio must be reachable and a GKD student
    must keep a layer."""
    from edgetune.compress.oneshot import check_group_size, model_widths

    widths = model_widths(src)
    layers = json.loads((Path(src) / "config.json").read_text()).get("num_hidden_layers", 0)
    for step in steps:
        if step.method == "structural":
            from edgetune.compress.structural import plan_mlp_pruning

            plan = plan_mlp_pruning(src, step.ratio)
            widths["intermediate_size"] = plan.width - plan.channels
        if getattr(step, "group_size", None) is not None:
            check_group_size(widths, step)
        if step.method == "gkd":
            from edgetune.compress.distill import check_drop_layers

            check_drop_layers(layers, step)
            layers -= step.drop_layers


def apply_steps(src: Path, steps, out: Path, ctx: CompressContext | None = None,
                on_step: Callable[[int, object, Path, dict], None] | None = None) -> list[dict]:
    """Apply `steps` in order from `src`; the last step's folder becomes `out`.
    `on_step(i, step, folder, info)` runs after each step (the stage measures and logs there).
    Returns one record per step (its options plus what it reported). An adapter folder
    (prefix / prompt tuning) keeps its adapter: the steps compress its base model."""
    from edgetune.models import ADAPTER_BASE, is_adapter_folder

    ctx = ctx or CompressContext(calibration=[])
    if is_adapter_folder(src):
        shutil.copytree(src, out, ignore=lambda d, names: [ADAPTER_BASE] if Path(d) == Path(src) else [])
        return apply_steps(Path(src) / ADAPTER_BASE, steps, out / ADAPTER_BASE, ctx, on_step)
    preflight(Path(src), steps)
    records = []
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        current = Path(src)
        for i, step in enumerate(steps):
            dst = Path(tmp) / f"step{i}"
            info = step_function(step.method)(current, dst, step, ctx) or {}
            records.append({**step.model_dump(), **info})
            if on_step:
                on_step(i, step, dst, info)
            current = dst
        if current == Path(src):  # no steps: the output is a copy of the input
            shutil.copytree(src, out)
        else:
            shutil.move(str(current), out)
    return records
