"""Layer-dropped student + generalized knowledge distillation (GKD; Agarwal et al., "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024).

The loss, the on-policy / sequence-level sampling and the training loop are trl's
`trl.experimental.gkd.GKDTrainer`. edgetune adds the student (the teacher without the decoder
layers that change their hidden state least, ShortGPT's Block Influence; a plain smaller model of
the same architecture) and the data: the task's train prompts followed by their label word, as
raw text with no chat template, because classification is scored by the label word's next-token
logit right after the raw prompt (`edgetune.scoring`).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgetune.config import BadInput

if TYPE_CHECKING:
    from edgetune.compress import CompressContext
    from edgetune.config import GKDStep


def gkd_distill(src: Path, dst: Path, step: GKDStep, ctx: CompressContext) -> dict:
    """Distil the model in `src` (teacher) into a student without `step.drop_layers` of its
    decoder layers (chosen by `step.layer_selection`) with trl's GKD trainer; save it to `dst`.

    Each example is the raw prompt's tokens (left-truncated to `step.max_length`, as scoring
    does) followed by the label word's (or answer's) tokens. The divergence (generalized JSD with
    `step.beta`) is taken on every token after the first `step.context_tokens` (`loss_on:
    sequence`: the student keeps the teacher's language model, not only its label position) or
    on the label word / answer alone (`completion`); with probability `step.lmbda` on up to
    `step.max_new_tokens` tokens the student samples instead (`step.seq_kd`: the teacher
    samples). `step.temperature` is the sampling temperature only: trl's loss compares the
    distributions at temperature 1.
    """
    from edgetune.models import count_parameters, load_hf, save_hf

    if ctx.data_dir is None:
        raise BadInput("compress.steps: gkd needs the task's train split (the prepared data folder)")
    teacher, tok = load_hf(src, dtype=torch.float32)
    dataset = completion_dataset(ctx, tok, step)
    kept = student_layers(teacher, step, selection_batches(ctx, dataset))
    student = keep_layers(teacher, kept)
    losses = train_gkd(student, teacher, tok, dataset, step)
    save_hf(student, tok, dst)
    params, teacher_params = count_parameters(student), count_parameters(teacher)
    return {
        "student_layers": student.config.num_hidden_layers,
        "teacher_layers": teacher.config.num_hidden_layers,
        "dropped_layers": ",".join(str(i) for i in range(teacher.config.num_hidden_layers) if i not in kept),
        "params": params,
        "params_removed_share": 1 - params / teacher_params,
        "distill_loss_first": losses[0],
        "distill_loss_last": losses[-1],
    }


def student_layers(teacher, step: GKDStep, batches: list[torch.Tensor]) -> list[int]:
    """The teacher's decoder layers the student keeps, in order."""
    n = teacher.config.num_hidden_layers
    check_drop_layers(n, step)
    k = step.drop_layers
    if step.layer_selection == "uniform":  # the middle of k equal slices: 30 layers, k 15 -> 1, 3, ..., 29
        dropped = {n * (2 * i + 1) // (2 * k) for i in range(k)}
    else:
        influence = block_influence(teacher, batches)
        dropped = set(sorted(range(n), key=influence.__getitem__)[:k])
    return [i for i in range(n) if i not in dropped]


def check_drop_layers(num_layers: int, step: GKDStep) -> None:
    if step.drop_layers >= num_layers:
        raise BadInput(f"compress.steps: gkd drop_layers {step.drop_layers} leaves no layer of the "
                       f"model's {num_layers}; expected at most {num_layers - 1}")


def block_influence(model, batches: list[torch.Tensor]) -> list[float]:
    """ShortGPT's Block Influence (Men et al., "ShortGPT: Layers in Large Language Models are
    More Redundant Than You Expect", 2024) of every decoder layer: 1 - the mean cosine similarity
    between the hidden state entering and leaving the layer, over all calibration tokens. Written
    here: no maintained library computes it."""
    layers = model.model.layers
    sums = [0.0] * len(layers)
    count = 0

    def hook(index):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            sums[index] += (1 - cos).sum().item()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
                count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [s / count for s in sums]


def selection_batches(ctx, dataset, rows: int = 16) -> list[torch.Tensor]:
    """Token sequences to score layers on: the calibrate stage's windows, or (without them) the
    first `rows` distillation examples."""
    if ctx.calibration:
        return [torch.tensor([list(seq)]) for seq in ctx.calibration[:rows]]
    return [torch.tensor([ids]) for ids in dataset["input_ids"][:rows]]


def keep_layers(teacher, kept: list[int]):
    """A fresh model of the teacher's class with the decoder layers `kept` copied from the
    teacher (and everything else: embeddings, final norm, LM head). Built from a shortened config
    rather than by slicing the teacher, so per-layer indices (KV cache slots) are renumbered."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student.load_state_dict(_renumber_layers(teacher.state_dict(), kept))
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def _renumber_layers(state: dict, kept: list[int]) -> dict:
    """Keep the weights of layers in `kept` (renamed layers.<old> -> layers.<new>) and all
    non-layer weights."""
    new_index = {str(old): str(new) for new, old in enumerate(kept)}
    out = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if "layers" in parts:
            i = parts.index("layers") + 1
            if parts[i] not in new_index:
                continue
            parts[i] = new_index[parts[i]]
        out[".".join(parts)] = tensor
    return out


def completion_ids(task, tok, target) -> list[int]:
    """The completion after the prompt: the label word (classification) or the reference
    answer (generation), as token ids."""
    from edgetune.tasks import GenerationTask

    text = str(target) if isinstance(task, GenerationTask) else task.label_words[int(target)]
    return tok(text, add_special_tokens=False).input_ids


def completion_dataset(ctx, tok, step):
    """A seeded subset of the task's train split (steps x batch_size rows, or all of it) as
    pre-tokenized prompt + completion examples (label word, or answer for generation tasks).
    `completion_mask` marks where the loss is taken: the completion, or (`loss_on: sequence`)
    everything after the first `context_tokens`. trl's ChatML collator takes `input_ids` with a
    `completion_mask` as is (its prompt = the tokens before the first 1), so no chat template is
    applied; `prompt` is only carried along because the collator looks that key up first."""
    import pandas as pd
    from datasets import Dataset

    from edgetune.tasks import get_task

    task = get_task(ctx.task)
    frame = pd.read_parquet(Path(ctx.data_dir) / "train.parquet")
    frame = frame.sample(n=min(len(frame), step.steps * step.batch_size), random_state=step.seed)
    rows = {"prompt": [], "input_ids": [], "attention_mask": [], "completion_mask": []}
    for prompt, target in zip(frame["prompt"], frame[task.target_column]):
        prompt_ids = tok(prompt, truncation=True, max_length=step.max_length).input_ids
        completion = completion_ids(task, tok, target)
        ids = prompt_ids + completion
        context = len(prompt_ids) if step.loss_on == "completion" else min(step.context_tokens, len(prompt_ids))
        rows["prompt"].append(prompt)
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["completion_mask"].append([0] * context + [1] * (len(ids) - context))
    return Dataset.from_dict(rows)


def train_gkd(student, teacher, tok, dataset, step) -> list[float]:
    """Run trl's GKDTrainer for `step.steps` optimizer steps; returns the logged training loss
    of every step. Nothing is saved or reported: the compress stage logs the returned dict."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cuda = torch.cuda.is_available()
    longest = max(len(ids) for ids in dataset["input_ids"])
    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(
            output_dir=out, max_steps=step.steps, per_device_train_batch_size=step.batch_size,
            learning_rate=step.lr, lmbda=step.lmbda, beta=step.beta, seq_kd=step.seq_kd,
            temperature=step.temperature, max_new_tokens=step.max_new_tokens, seed=step.seed,
            max_length=longest,  # prompts are already cut to step.max_length
            logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=not cuda, bf16=cuda, fp16=False,
            gradient_checkpointing=False,  # trl turns it on; recomputing only slows small models
        )
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                             train_dataset=dataset, processing_class=tok)
        trainer.train()
    student.eval()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
