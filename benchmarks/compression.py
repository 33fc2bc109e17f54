"""Compression recipes side by side on one model: size, parameters, sparsity, bits, WikiText-2
perplexity, task accuracy, CPU tokens/s and peak memory.

Each recipe is a `compress.steps` list run through the pipeline's own `apply_steps`; each result
folder is then measured in a fresh process (`evaluate_isolated`, as the evaluate stage does) and
its accuracy re-measured in another fresh process from the saved folder alone, to show that it
reloads and reproduces what was logged.

    python -m benchmarks.compression --model models/finetuned/merged --data data/prepared
    python -m benchmarks.compression --recipes fp32 gptq_w4 rtn_w4     # a subset
    python -m benchmarks.compression --redo gkd_student                # redo one, keep the rest

Writes benchmarks/results/compression.json (+ a size-vs-perplexity plot) and one MLflow run
with a child run per recipe. Finished recipes are kept in compression.tmp, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import CACHE, RESULTS, model_dir, save

GPTQ4 = {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False}  # the best W4 scheme measured
GPTQ4_SYM64 = {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": True}
STRUCTURAL = {"method": "structural", "ratio": 0.2, "recovery_steps": 300}

# label -> compress.steps
RECIPES: dict[str, list[dict]] = {
    "fp32": [],
    "gptq_w4": [GPTQ4],
    "gptq_w4_sym_g64": [GPTQ4_SYM64],
    "gptq_w4_sym_g32": [{**GPTQ4_SYM64, "group_size": 32}],
    "rtn_w4": [{**GPTQ4, "method": "rtn"}],
    "rtn_w4_sym_g64": [{**GPTQ4_SYM64, "method": "rtn"}],
    "gptq_w8": [{"method": "gptq", "bits": 8, "group_size": 64}],
    "int8_torchao": [{"method": "int8"}],
    "sparsegpt_50": [{"method": "sparsegpt", "sparsity": 0.5}],
    "wanda_50": [{"method": "wanda", "sparsity": 0.5}],
    "magnitude_50": [{"method": "magnitude", "sparsity": 0.5}],
    "sparsegpt_2of4": [{"method": "sparsegpt", "sparsity": 0.5, "mask": "2:4"}],
    "magnitude_2of4": [{"method": "magnitude", "sparsity": 0.5, "mask": "2:4"}],
    "structural_20_no_recovery": [{**STRUCTURAL, "recovery_steps": 0}],
    "structural_20": [STRUCTURAL],
    "gkd_student": [{"method": "gkd", "drop_layers": 6, "lmbda": 0.0, "lr": 1e-4, "steps": 200}],
    "structural_20+gptq_w4": [{**STRUCTURAL, "recovery_steps": 100}, GPTQ4_SYM64],
}


def reload_accuracy(folder: str, data_dir: str, task: str, batch_size: int) -> float:
    """The task's score of a saved folder (the evaluate stage's task_metrics), in a process that
    has seen nothing but the folder."""
    import pandas as pd

    from edgetune.config import EvaluateParams
    from edgetune.evaluate import task_metrics
    from edgetune.models import load_hf
    from edgetune.tasks import get_task

    model, tok = load_hf(folder)
    frame = pd.read_parquet(Path(data_dir) / "eval.parquet")
    return task_metrics(get_task(task), model, tok, frame, EvaluateParams(batch_size=batch_size), 128,
                        "reload")["score"]


def in_fresh_process(fn, *args):
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run_recipe(label: str, specs: list[dict], model: Path, data: Path, ctx, eval_cfg, task: str) -> dict:
    from edgetune.compress import apply_steps
    from edgetune.config import parse_params
    from edgetune.evaluate import evaluate_isolated

    steps = parse_params({"compress": {"steps": specs}}).compress.steps
    out = CACHE / "compression" / label
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records = apply_steps(model, steps, out, ctx)
    compress_seconds = time.perf_counter() - start
    metrics = evaluate_isolated(str(out), str(data), task, eval_cfg, name=label)
    reloaded = in_fresh_process(reload_accuracy, str(out), str(data), task, eval_cfg.batch_size)
    return {"recipe": " -> ".join(s["method"] for s in specs) or "none", "steps": records,
            "compress_seconds": compress_seconds, **metrics, "accuracy_reloaded": reloaded}


def generation_speed(folder: str, prompt: str, new_tokens: int, repeats: int) -> float:
    """ms per generated token at batch 1 (median of `repeats`), in a fresh process."""
    from edgetune.evaluate import latency_ms_per_token
    from edgetune.models import load_hf

    model, tok = load_hf(folder)
    return latency_ms_per_token(model, tok, prompt, new_tokens, repeats)


def measure_speed_back_to_back(results: dict, data: Path, new_tokens: int = 64, repeats: int = 5) -> None:
    """Re-time every recipe's generation one after another at the end, so the speed ratios come
    from one stretch of machine time (the per-recipe timings above are minutes apart on a shared
    CPU). Overwrites latency_ms_per_token / tokens_per_s."""
    import pandas as pd

    prompt = pd.read_parquet(data / "eval.parquet")["prompt"].iloc[0]
    for label, r in results.items():
        folder = str(CACHE / "compression" / label)
        ms = in_fresh_process(generation_speed, folder, prompt, new_tokens, repeats)
        r.update(latency_ms_per_token=ms, tokens_per_s=1000 / ms)
        print(f"{label}: {1000 / ms:.1f} tokens/s")


def peak_memory(folder: str, data_dir: str, task: str) -> float:
    """Peak RSS (MB) of a fresh process that loads the folder and runs the evaluate stage's
    heaviest steps once: a batch of 16 prompts, one 256-token perplexity window, 32 generated
    tokens (the evaluate stage's own peak_rss_mb, without the full dev set)."""
    import pandas as pd

    from edgetune.devices import peak_rss_mb, reset_peak_rss
    from edgetune.evaluate import latency_ms_per_token, perplexity
    from edgetune.models import load_hf
    from edgetune.scoring import accuracy, label_token_ids
    from edgetune.tasks import get_task

    reset_peak_rss()
    model, tok = load_hf(folder)
    frame = pd.read_parquet(Path(data_dir) / "eval.parquet").head(16)
    accuracy(model, tok, frame["prompt"].tolist(), frame["label"].tolist(),
             label_token_ids(tok, get_task(task).label_words), 16)
    perplexity(model, tok, (Path(data_dir) / "wikitext2_test.txt").read_text()[:20_000], 1, 256)
    latency_ms_per_token(model, tok, frame["prompt"].iloc[0], 32, repeats=1)
    return peak_rss_mb()


def measure_peak_memory(results: dict, data: Path, task: str) -> None:
    for label, r in results.items():
        r["peak_rss_mb"] = in_fresh_process(peak_memory, str(CACHE / "compression" / label), str(data), task)
        print(f"{label}: peak {r['peak_rss_mb']:.0f} MB")


def keep_reference_speed(timed: dict, reference: dict) -> None:
    """--redo: the redone recipes were timed next to a fresh fp32 run, possibly on a busier
    machine than the kept rows. Keep fp32's earlier tokens/s (the kept rows' reference) and
    give each redone recipe fp32's earlier speed x its speed ratio measured in this run."""
    fresh = timed["fp32"]["tokens_per_s"]
    for label, r in timed.items():
        ratio = r["tokens_per_s"] / fresh
        r["tokens_per_s"] = reference["tokens_per_s"] * ratio
        r["latency_ms_per_token"] = 1000 / r["tokens_per_s"]
        r["speed_ratio_timed_with_fp32"] = ratio


def add_ratios(results: dict) -> None:
    """Each recipe against fp32, from this one run: size, perplexity, speed, accuracy kept."""
    ref = results.get("fp32")
    if not ref:
        return
    for r in results.values():
        r["size_ratio"] = r["size_mb"] / ref["size_mb"]
        r["perplexity_ratio"] = r["perplexity"] / ref["perplexity"]
        r["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["accuracy_kept"] = r["accuracy"] / ref["accuracy"]


def markdown_table(results: dict) -> str:
    """The README table: one row per recipe, ratios against fp32 from this run."""
    head = ("| recipe | size MB | params | sparsity | bits | WikiText-2 ppl (× fp32) | SST-2 acc (kept) "
            "| tokens/s (× fp32) | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| {label} | {r['size_mb']:.0f} | {r['params'] / 1e6:.1f}M | {r['sparsity']:.2f} | {r['bits']} "
            f"| {r['perplexity']:.1f} ({r['perplexity_ratio']:.2f}) | {r['accuracy']:.3f} ({r['accuracy_kept']:.1%}) "
            f"| {r['tokens_per_s']:.1f} ({r['speedup']:.2f}) | {r['peak_rss_mb']:.0f} |"
            for label, r in results.items()]
    return head + "\n".join(rows) + "\n"


def plot(results: dict, path: Path) -> None:
    """Size on disk vs WikiText-2 perplexity, one labelled point per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in results.items():
        ax.scatter(r["size_mb"], r["perplexity"])
        ax.annotate(label, (r["size_mb"], r["perplexity"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title("Compression recipes on the fine-tuned model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF folder to compress (default: models/finetuned/merged, "
                   "else models/base or the packaged SmolLM2)")
    p.add_argument("--data", default="data/prepared", help="prepared data folder (the prepare stage)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--calibration-seq-len", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=32, help="WikiText-2 test windows of 256 tokens")
    p.add_argument("--max-eval", type=int, help="first N dev examples (default: all)")
    p.add_argument("--name", default="compression")
    p.add_argument("--remeasure", action="store_true",
                   help="keep results/<name>.json's recipes; redo only speed and peak memory")
    p.add_argument("--redo", nargs="+", choices=list(RECIPES), default=[], metavar="RECIPE",
                   help="keep results/<name>.json's other recipes, redo these, and re-time them "
                   "next to fp32 (the others keep their speed and peak memory)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from edgetune.compress import CompressContext, calibration
    from edgetune.config import CalibrationParams, EvaluateParams

    finetuned = Path("models/finetuned/merged")
    model = Path(args.model) if args.model else (finetuned if (finetuned / "config.json").is_file()
                                                 else model_dir(None))
    data = Path(args.data)
    calib_cfg = CalibrationParams(samples=args.calibration_samples, seq_len=args.calibration_seq_len)
    ctx = CompressContext(calibration=calibration.build(calib_cfg, data, AutoTokenizer.from_pretrained(model)),
                          data_dir=data, task=args.task)
    eval_cfg = EvaluateParams(ppl_windows=args.ppl_windows, max_examples=args.max_eval)
    partial = RESULTS / f"{args.name}.tmp"
    results = json.loads(partial.read_text()) if partial.is_file() else {}
    if args.remeasure or args.redo:
        results = json.loads((RESULTS / f"{args.name}.json").read_text())["results"]
        results = {k: v for k, v in results.items() if k not in args.redo}
    for label in args.redo or ([] if args.remeasure else args.recipes):
        if label in results:
            print(f"{label}: kept from {partial}")
            continue
        results[label] = run_recipe(label, RECIPES[label], model, data, ctx, eval_cfg, args.task)
        print(f"{label}: " + ", ".join(f"{k} {results[label][k]:.4g}" for k in
                                       ("accuracy", "perplexity", "size_mb", "tokens_per_s")))
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(results, indent=2))
    results = {k: results[k] for k in RECIPES if k in results}  # table order
    # --redo times the redone recipes next to fp32 (their ratios' reference) and keeps the rest
    timed = {k: r for k, r in results.items() if k in {"fp32", *args.redo}} if args.redo else results
    reference = dict(results.get("fp32", {}))
    measure_speed_back_to_back(timed, data)
    measure_peak_memory(timed, data, args.task)
    if args.redo and reference:
        keep_reference_speed(timed, reference)
    add_ratios(results)
    (RESULTS / f"{args.name}.md").write_text(markdown_table(results))
    plot(results, RESULTS / f"{args.name}.png")
    params = {"model": str(model), "task": args.task, "calibration": calib_cfg.model_dump(),
              "evaluate": eval_cfg.model_dump(), "recipes": {k: RECIPES[k] for k in results}}
    path = save(args.name, results, {k: json.dumps(v) if isinstance(v, dict) else v for k, v in params.items()},
                children={label: {"recipe": r["recipe"]} for label, r in results.items()},
                artifacts=[RESULTS / f"{args.name}.png"])
    partial.unlink(missing_ok=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
