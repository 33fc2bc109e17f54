"""Structural pruning after LLM-Pruner (Ma et al., "LLM-Pruner: On the Structural Pruning of
Large Language Models", NeurIPS 2023): discover coupled structures, estimate their importance,
remove the least important ones, then recover with a short LoRA fine-tune.

- Discovery: torch-pruning's DependencyGraph traces the HF model and couples each MLP channel
  of gate_proj, up_proj (outputs) and down_proj (input) into one group.
- Estimation: torch-pruning's GroupTaylorImportance (|w * dL/dw| summed per channel, averaged
  over the group) with gradients of the LM loss on calibration sequences, or its
  GroupMagnitudeImportance (L2 norm); BasePruner (alias MetaPruner) ranks and prunes locally.
- Recovery: peft LoRA on every projection for `recovery_steps`, then merge_and_unload().

edgetune's part: only the MLP intermediate channels are pruned, the same number in every
decoder layer, so the result is a plain model of the same class with a smaller
`intermediate_size` that `from_pretrained` reloads. Attention heads are kept (pruning them
uniformly and GQA-consistently would change `num_attention_heads` / `head_dim` as well; not
done here). `ratio` is the share of ALL parameters removed (LLM-Pruner's convention), turned
into channels per layer from the config before any weight is loaded; recovery trains on the
task's classification loss (scoring.py), as fine-tuning does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetune.config import BadInput

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The kept width is rounded to a multiple of 64 (so a later GPTQ / RTN step's group size 64
# still divides it), else of 8, when that moves the channel count by <= 5%.
KEEP_MULTIPLES = (64, 8)
TAYLOR_SEQUENCES = 8  # calibration sequences whose LM-loss gradients score the channels
TAYLOR_BATCH = 4


@dataclass(frozen=True)
class MlpPlan:
    """How many MLP channels each decoder layer loses to reach the ratio."""

    params: int  # the whole model's parameters (tied weights counted once)
    width: int  # intermediate_size before pruning
    channels: int  # removed per layer
    per_channel: int  # parameters one channel holds across all layers


def structural_prune(src: Path, dst: Path, step, ctx) -> dict:
    """Prune `step.ratio` of the parameters as whole MLP channels, recover with LoRA, save."""
    from edgetune.models import count_parameters, load_hf, save_hf

    plan = plan_mlp_pruning(src, step.ratio)
    check_inputs(step, ctx)
    model, tok = load_hf(src, dtype=torch.float32)
    start = time.perf_counter()
    prune_mlp_channels(model, plan, step, ctx.calibration)
    info = {"prune_seconds": round(time.perf_counter() - start, 2)}
    if step.recovery_steps:
        model, losses = recover_with_lora(model, tok, step, ctx)
        info |= {"recovery_loss_first": losses[0], "recovery_loss_last": losses[-1]}
    save_hf(model, tok, dst)
    params = count_parameters(model)
    return {"params_before": plan.params, "params": params,
            "params_removed_share": 1 - params / plan.params,
            "intermediate_size_before": plan.width, "intermediate_size": model.config.intermediate_size,
            **info}


# ----------------------------------------------------------------- cheap checks (no weights)
def plan_mlp_pruning(src: Path, ratio: float) -> MlpPlan:
    """Channels per layer for `ratio`, from a weightless (meta) copy of the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    width = config.intermediate_size
    params = sum(p.numel() for p in model.parameters())
    per_channel = 3 * config.hidden_size * len(layers)
    return MlpPlan(params, width, channels_for_ratio(ratio, params, width, per_channel), per_channel)


def decoder_layers(model):
    """The decoder layers, checked to have a Llama-style MLP (gate_proj, up_proj, down_proj)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers or not all(all(hasattr(layer.mlp, n) for n in MLP_PROJECTIONS) for layer in layers):
        raise BadInput(f"structural pruning needs a Llama-style model (model.layers[i].mlp with "
                       f"{', '.join(MLP_PROJECTIONS)}); got {type(model).__name__}")
    return layers


def channels_for_ratio(ratio: float, params: int, width: int, per_channel: int) -> int:
    """MLP channels to remove per layer so that ~`ratio` of `params` go; at least one is kept."""
    channels = round(ratio * params / per_channel)
    most = width - 1
    if not 0 < channels <= most:
        raise BadInput(
            f"compress.steps: structural ratio {ratio} means removing {channels} of {width} MLP "
            f"channels per layer; pruning MLP channels reaches shares of {per_channel / params:.4f} "
            f"to {most * per_channel / params:.4f} of this model's parameters")
    for multiple in KEEP_MULTIPLES:
        rounded = width - multiple * round((width - channels) / multiple)
        if 0 < rounded <= most and abs(rounded - channels) <= 0.05 * channels:
            return rounded
    return channels


def check_inputs(step, ctx) -> None:
    if step.importance == "taylor" and not ctx.calibration:
        raise BadInput("compress.steps: structural with importance 'taylor' needs calibration "
                       "sequences (the calibrate stage's output)")
    if step.recovery_steps and not (ctx.data_dir and (Path(ctx.data_dir) / "train.parquet").is_file()):
        raise BadInput(f"compress.steps: structural recovery_steps > 0 needs the task's train split "
                       f"at {ctx.data_dir}/train.parquet (or recovery_steps: 0)")


# ----------------------------------------------------------------- discovery, estimation, pruning
def prune_mlp_channels(model, plan: MlpPlan, step, calibration: list[list[int]]) -> None:
    """Remove `plan.channels` channels from every layer's MLP, least important first."""
    import torch_pruning as tp

    model.config.use_cache = False  # torch-pruning traces tensors only, not a KV cache
    layers = decoder_layers(model)
    mlp = {m for layer in layers for m in layer.mlp.modules()}
    importance = (tp.importance.GroupTaylorImportance() if step.importance == "taylor"
                  else tp.importance.GroupMagnitudeImportance(p=2))
    # Tracing needs shapes only: a calibration snippet, or dummy ids when there is none (magnitude).
    example = torch.tensor([calibration[0][:16]]) if calibration else torch.zeros(1, 16, dtype=torch.long)
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=example,
        importance=importance,
        global_pruning=False,  # rank within each layer: every layer loses the same count
        # torch-pruning keeps int(width * (1 - ratio)) channels; half a channel of slack makes
        # that exactly width - channels despite float rounding.
        pruning_ratio=(plan.channels - 0.5) / plan.width,
        # Groups containing any of these are skipped: only the MLP channel groups remain.
        ignored_layers=[m for m in model.modules() if m not in mlp and not any(m.children())],
        unwrapped_parameters=[(p, 0) for p in model.parameters() if p.dim() == 1],  # RMSNorm weights
        output_transform=lambda out: out.logits,
    )
    if step.importance == "taylor":
        accumulate_lm_gradients(model, mlp, calibration[:TAYLOR_SEQUENCES])
    pruner.step()
    model.zero_grad(set_to_none=True)
    model.config.intermediate_size = plan.width - plan.channels
    assert all(layer.mlp.gate_proj.out_features == model.config.intermediate_size for layer in layers)


def accumulate_lm_gradients(model, mlp: set, sequences: list[list[int]]) -> None:
    """Sum the LM loss gradients of the MLP weights over `sequences` (the rest stays frozen)."""
    mlp_params = {id(p) for m in mlp for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in mlp_params)
    model.zero_grad(set_to_none=True)
    for start in range(0, len(sequences), TAYLOR_BATCH):
        ids = torch.tensor(sequences[start:start + TAYLOR_BATCH])
        model(input_ids=ids, labels=ids).loss.backward()


# ----------------------------------------------------------------- recovery
def recover_with_lora(model, tok, step, ctx):
    """`recovery_steps` of AdamW on LoRA adapters with the task's fine-tuning loss (label words
    or answer tokens, edgetune.objectives) on seeded batches of the train split; returns
    (merged model, per-step losses)."""
    import pandas as pd
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from edgetune.objectives import objective_for
    from edgetune.tasks import get_task

    objective = objective_for(get_task(ctx.task), tok, step.max_length, model)
    frame = pd.read_parquet(Path(ctx.data_dir) / "train.parquet")
    prompts, targets = list(frame["prompt"]), list(frame[objective.target_column])
    torch.manual_seed(step.seed)  # LoRA A matrices
    lora = LoraConfig(r=step.lora_r, lora_alpha=2 * step.lora_r, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=step.recovery_lr)
    rng = torch.Generator().manual_seed(step.seed)
    model.train()
    losses = []
    for _ in tqdm(range(step.recovery_steps), desc="structural: LoRA recovery"):
        idx = torch.randint(len(prompts), (step.recovery_batch_size,), generator=rng)
        batch = objective.batch([prompts[i] for i in idx.tolist()], [targets[i] for i in idx.tolist()])
        loss = objective.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return model.merge_and_unload(), losses
