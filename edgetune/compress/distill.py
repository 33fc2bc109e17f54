"""Layer-dropped student + generalized knowledge distillation (GKD; Agarwal et al., "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024).

The loss, the on-policy / sequence-level sampling and the training loop are trl's
`trl.experimental.gkd.GKDTrainer`. edgetune adds the student (every k-th decoder layer of the
teacher, a plain smaller model of the same architecture) and the data: the task's train prompts
followed by their label word, as raw text with no chat template, because classification is
scored by the label word's next-token logit right after the raw prompt (`edgetune.scoring`).
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
    """Distil the model in `src` (teacher) into a student keeping decoder layers 0, k, 2k, ...
    (k = `step.keep_every`) with trl's GKD trainer, and save the student to `dst`.

    Each example is the raw prompt's tokens (left-truncated to `step.max_length`, as scoring
    does) followed by the label word's tokens; the divergence (generalized JSD with `step.beta`)
    is taken where the label word is predicted (the position scoring reads), or, with
    probability `step.lmbda`, on up to `step.max_new_tokens` tokens the student samples after the
    prompt (`step.seq_kd`: the teacher samples instead). `step.temperature` is the sampling
    temperature only: trl's loss compares the distributions at temperature 1.
    """
    from edgetune.models import count_parameters, load_hf, save_hf

    if ctx.data_dir is None:
        raise BadInput("compress.steps: gkd needs the task's train split (the prepared data folder)")
    teacher, tok = load_hf(src, dtype=torch.float32)
    student = drop_layers(teacher, step.keep_every)
    dataset = completion_dataset(ctx, tok, step)
    losses = train_gkd(student, teacher, tok, dataset, step)
    save_hf(student, tok, dst)
    params, teacher_params = count_parameters(student), count_parameters(teacher)
    return {
        "student_layers": student.config.num_hidden_layers,
        "teacher_layers": teacher.config.num_hidden_layers,
        "params": params,
        "params_removed_share": 1 - params / teacher_params,
        "distill_loss_first": losses[0],
        "distill_loss_last": losses[-1],
    }


def drop_layers(teacher, keep_every: int):
    """A fresh model of the teacher's class with decoder layers 0, k, 2k, ... copied from the
    teacher (and everything else: embeddings, final norm, LM head). Built from a shortened config
    rather than by slicing the teacher, so per-layer indices (KV cache slots) are renumbered."""
    from transformers import AutoModelForCausalLM

    kept = list(range(0, teacher.config.num_hidden_layers, keep_every))
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
    trl's ChatML collator takes `input_ids` with a `completion_mask` as is, so no chat template
    is applied; `prompt` is only carried along because the collator looks that key up first."""
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
        rows["prompt"].append(prompt)
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["completion_mask"].append([0] * len(prompt_ids) + [1] * len(completion))
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
