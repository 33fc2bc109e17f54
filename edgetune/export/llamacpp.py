"""A GGUF scored inside llama.cpp (llama-cpp-python), with the metrics and inputs the torch
rows use (edgetune/evaluate.py), so the two sit in one table:

    accuracy / EM-F1 / ROUGE-L   the same prompts, left-truncated alike; classification from
                                 the label words' next-token logits, generation greedy
    perplexity                   the same WikiText-2 windows, exp(mean next-token NLL)
    tokens_per_s                 greedy generation of evaluate.latency_new_tokens tokens after
                                 the first eval prompt, prompt included (as the torch rows)
    prompt_tokens_per_s          one perplexity window's tokens in one batch
    generation_tokens_per_s      new tokens only, one at a time
    peak_rss_mb                  of a process that scored only this file

Tokens come from the GGUF's own tokenizer; tests/test_export.py checks they equal the HF
tokenizer's. Threads: evaluate.threads, else torch's default (the physical cores), for both
rows alike.
"""

from __future__ import annotations

import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from edgetune.config import EvaluateParams


def open_gguf(path: Path, n_ctx: int, threads: int, logits_all: bool = False):
    from edgetune.export.gguf import llama_cpp

    return llama_cpp().Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                             logits_all=logits_all, verbose=False)


def tokens(llm, text: str, max_length: int | None = None) -> list[int]:
    """`text`'s tokens as the HF tokenizer makes them (no BOS added, special tokens parsed),
    left-truncated to max_length as prepare_tokenizer does."""
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    return ids[-max_length:] if max_length else ids


def current_logits(llm) -> np.ndarray:
    """The next-token logits after the last decoded token, read from llama.cpp's context
    (llama_get_logits_ith; Llama.scores holds them only with logits_all)."""
    from edgetune.export.gguf import llama_cpp

    ptr = llama_cpp().llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def last_logits(llm, ids: list[int]) -> np.ndarray:
    """Next-token logits after `ids`, decoded from an empty context."""
    llm.reset()
    llm.eval(ids)
    return current_logits(llm)


def label_predictions(llm, prompts, label_words, max_length: int, progress: str) -> list[int]:
    """Index of the argmax label word after each prompt, as scoring.predict does with torch."""
    from tqdm.auto import tqdm

    label_ids = [tokens(llm, w)[0] for w in label_words]
    return [int(np.argmax(last_logits(llm, tokens(llm, prompt, max_length))[label_ids]))
            for prompt in tqdm(prompts, desc=progress, leave=False)]


def greedy(llm, ids: list[int], new_tokens: int, stop_ids: set[int] = frozenset()) -> list[int]:
    """Greedy decoding: argmax of llama.cpp's logits, one token per decode call."""
    out = []
    logits = last_logits(llm, ids)
    for _ in range(new_tokens):
        nxt = int(np.argmax(logits))
        if nxt in stop_ids:
            break
        out.append(nxt)
        llm.eval([nxt])
        logits = current_logits(llm)
    return out


def generated_answers(llm, prompts, task, max_length: int, eos: set[int], progress: str) -> list[str]:
    """Greedy answers cut and stripped as generation.generate_answers does."""
    from tqdm.auto import tqdm

    answers = []
    for prompt in tqdm(prompts, desc=progress, leave=False):
        new = greedy(llm, tokens(llm, prompt, max_length), task.max_new_tokens, eos)
        text = llm.detokenize(new).decode("utf-8", errors="replace").strip()
        answers.append((text.split(task.stop, 1)[0] if task.stop else text).strip())
    return answers


def perplexity(path: Path, text: str, windows: int, seq_len: int, threads: int) -> float:
    """exp(mean next-token NLL) over the first `windows` windows, as evaluate.perplexity."""
    llm = open_gguf(path, seq_len, threads, logits_all=True)
    ids = tokens(llm, text)
    n = min(windows, len(ids) // seq_len)
    nll, count = 0.0, 0
    for w in range(n):
        chunk = ids[w * seq_len:(w + 1) * seq_len]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:seq_len - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz - logits[np.arange(seq_len - 1), chunk[1:]]).sum())
        count += seq_len - 1
    del llm
    return math.exp(nll / count)


def speed(llm, prompt_ids: list[int], window: list[int], new_tokens: int, repeats: int = 3) -> dict[str, float]:
    """Median of `repeats` timings after one warm-up, as evaluate.latency_ms_per_token."""
    def timed(fn):
        fn()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    whole = timed(lambda: greedy(llm, prompt_ids, new_tokens))
    prefill = timed(lambda: last_logits(llm, prompt_ids))
    batch = timed(lambda: last_logits(llm, window))
    return {"latency_ms_per_token": 1000 * whole / new_tokens, "tokens_per_s": new_tokens / whole,
            "generation_tokens_per_s": new_tokens / max(whole - prefill, 1e-9),
            "prompt_tokens_per_s": len(window) / batch}


def score_gguf(path: str, data_dir: str, task_name: str, cfg: EvaluateParams, name: str, threads: int,
               max_length: int = 128) -> dict[str, float]:
    """Every metric of one GGUF file (meant for its own process: see score_isolated). Torch is
    imported only after peak_rss_mb is read (classification metrics), so that peak is
    llama.cpp's, Python's and pandas'."""
    import pandas as pd

    from edgetune.devices import peak_rss_mb, reset_peak_rss
    from edgetune.tasks import GenerationTask, get_task

    reset_peak_rss()
    task = get_task(task_name)
    frame = pd.read_parquet(Path(data_dir) / "eval.parquet")
    if cfg.max_examples:
        frame = frame.head(cfg.max_examples)
    prompts = frame["prompt"].tolist()
    text = (Path(data_dir) / "wikitext2_test.txt").read_text()
    llm = open_gguf(Path(path), 1024, threads)
    if isinstance(task, GenerationTask):
        from edgetune.generation import score

        answers = generated_answers(llm, prompts, task, 512, {llm.token_eos()}, f"{name} answers")
        metrics = score(task.metric, answers, [list(a) for a in frame["answers"]])
    else:
        predictions = label_predictions(llm, prompts, task.label_words, max_length, f"{name} accuracy")
    window = tokens(llm, text)[:cfg.ppl_seq_len]
    timing = speed(llm, tokens(llm, prompts[0], max_length), window, cfg.latency_new_tokens)
    del llm
    ppl = perplexity(Path(path), text, cfg.ppl_windows, cfg.ppl_seq_len, threads)
    peak = peak_rss_mb()
    if not isinstance(task, GenerationTask):  # after the peak is read: this imports torch
        from edgetune.scoring import classification_metrics

        metrics = classification_metrics(predictions, frame["label"].tolist(), task.label_words)
    return {**metrics, "score": metrics[task.primary_metric], "perplexity": ppl,
            "size_mb": Path(path).stat().st_size / 1e6, **timing, "threads": threads,
            "peak_rss_mb": peak, "eval_examples": len(frame)}


def score_isolated(path: str, data_dir: str, task_name: str, cfg: EvaluateParams, name: str) -> dict[str, float]:
    """score_gguf in a fresh spawned process, so peak memory is this file's alone; as many
    threads as the torch rows use (evaluate.threads, else torch's default)."""
    import torch

    threads = cfg.threads or torch.get_num_threads()
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(score_gguf, path, data_dir, task_name, cfg, name, threads).result()
