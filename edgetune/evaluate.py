"""Evaluate a saved HF model: the task's metric (accuracy, EM / F1, ROUGE-L), WikiText-2
perplexity, size, sparsity, bits, latency, peak memory.

Each model is evaluated in a fresh spawned process whose resident-memory high-water mark is
reset first (VmHWM), so its peak memory is its own: not inflated by models evaluated before it,
nor by a large parent process (a spawned child inherits the parent's ru_maxrss on Linux). On
model.device cuda its peak GPU memory too (devices.peak_memory; untested on a GPU here).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from edgetune.config import EvaluateParams, ModelParams


def perplexity(model, tok, text: str, windows: int, seq_len: int) -> float:
    """exp(mean next-token NLL) over the first `windows` non-overlapping windows of `text`."""
    import torch

    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(windows, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"perplexity text has {len(ids)} tokens, fewer than one window of {seq_len}")
    chunks = ids[: n * seq_len].view(n, seq_len)
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            chunk = chunk.to(model.device)
            out = model(input_ids=chunk[None], labels=chunk[None], use_cache=False)
            nll += out.loss.item() * (seq_len - 1)
            count += seq_len - 1
    return math.exp(nll / count)


def latency_ms_per_token(model, tok, prompt: str, new_tokens: int, repeats: int = 3) -> float:
    """Wall time of greedy generation at batch 1, per generated token: the median of `repeats`
    timed runs after one warm-up (a shared CPU makes single timings noisy)."""
    import statistics

    import torch

    inputs = tok(prompt, return_tensors="pt").to(model.device)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id)
    timings = []
    with torch.no_grad():
        model.generate(**inputs, **{**gen, "max_new_tokens": 2, "min_new_tokens": 2})
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(**inputs, **gen)
            timings.append(time.perf_counter() - t0)
    return 1000 * statistics.median(timings) / new_tokens


def task_metrics(task, model, tok, frame, cfg: EvaluateParams, max_length: int,
                 name: str) -> dict[str, float]:
    """The task's own metrics on `frame`: for classification, accuracy, macro-F1 and the share
    of each predicted label (label-word logits); for generation, greedy answers scored by the
    task's metric (EM / F1, ROUGE-L). `score` repeats the task's primary metric, so runs of
    different tasks sort on one column."""
    from edgetune.tasks import GenerationTask

    prompts = frame["prompt"].tolist()
    if isinstance(task, GenerationTask):
        from edgetune.generation import generate_answers, score

        answers = generate_answers(model, tok, prompts, task.max_new_tokens, cfg.batch_size,
                                   progress=f"{name} answers", stop=task.stop)
        metrics = score(task.metric, answers, [list(a) for a in frame["answers"]])
    else:
        from edgetune.scoring import classification_metrics, label_token_ids, predict

        label_ids = label_token_ids(tok, task.label_words)
        predictions = predict(model, tok, prompts, label_ids, batch_size=cfg.batch_size,
                              max_length=max_length, progress=f"{name} accuracy")
        metrics = classification_metrics(predictions, frame["label"].tolist(), task.label_words)
    return {**metrics, "score": metrics[task.primary_metric]}


def evaluate_model(model_dir: str, data_dir: str, task_name: str, cfg: EvaluateParams,
                   max_length: int = 128, name: str | None = None,
                   runtime: ModelParams | None = None) -> dict[str, float]:
    """All metrics of one model folder, on runtime's model.device / dtype (None: the CPU, as
    saved). Meant to run in its own process (see evaluate_isolated)."""
    import pandas as pd
    import torch

    from edgetune.devices import load_model, peak_memory, reset_peak, resolve
    from edgetune.models import (ADAPTER_BASE, count_parameters, dir_size_bytes, is_adapter_folder,
                                 linear_sparsity, weight_bits)
    from edgetune.tasks import get_task

    device = resolve(runtime.device if runtime else "cpu")
    reset_peak(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = get_task(task_name)
    model, tok = load_model(model_dir, runtime)
    frame = pd.read_parquet(Path(data_dir) / "eval.parquet")
    if cfg.max_examples:
        frame = frame.head(cfg.max_examples)
    name = name or Path(model_dir).name
    metrics = task_metrics(task, model, tok, frame, cfg, max_length, name)
    text = (Path(data_dir) / "wikitext2_test.txt").read_text()
    ppl = perplexity(model, tok, text, cfg.ppl_windows, cfg.ppl_seq_len)
    ms = latency_ms_per_token(model, tok, frame["prompt"].iloc[0], cfg.latency_new_tokens)
    return {
        **metrics,
        "perplexity": ppl,
        "size_mb": dir_size_bytes(model_dir) / 1e6,
        "params": count_parameters(model),
        "sparsity": linear_sparsity(model),
        "bits": weight_bits(model_dir if not is_adapter_folder(model_dir) else Path(model_dir) / ADAPTER_BASE),
        "latency_ms_per_token": ms,
        "tokens_per_s": 1000 / ms,
        **peak_memory(device),
        "eval_examples": len(frame),
    }


def check_inputs(data: str, models) -> None:
    """Every model an HF folder and the prepared files readable, before any process is spawned
    (an error inside the evaluation process would arrive as a traceback)."""
    from edgetune.config import BadInput
    from edgetune.models import model_folder
    from edgetune.tasks.base import require_parquet

    require_parquet(Path(data) / "eval.parquet")
    text = Path(data) / "wikitext2_test.txt"
    if not text.is_file():
        raise BadInput(f"{text}: file not found (re-run the prepare stage)")
    for path in models:
        model_folder(path)


def evaluate_isolated(model_dir: str, data_dir: str, task_name: str, cfg: EvaluateParams,
                      name: str | None = None, runtime: ModelParams | None = None) -> dict:
    """evaluate_model in a fresh spawned process, so peak memory is this model's alone."""
    if runtime is not None:
        from edgetune.devices import check

        check(runtime.device)  # bad input (exit 2) here rather than inside the process
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(evaluate_model, model_dir, data_dir, task_name, cfg, 128, name, runtime).result()
