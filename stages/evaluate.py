"""evaluate: the task's metric (accuracy, EM / F1, ROUGE-L), WikiText-2 perplexity, size,
latency and peak memory of the fine-tuned and compressed models, each in its own process, next
to the zero-shot scores of the zeroshot stage.

No model is measured twice: the zero-shot scores come from the zeroshot stage (--zero-shot),
and a compressed model the compress stage already measured (compress.evaluate_steps) is taken
from its metrics (--compress-metrics) with the same measurement function and knobs."""

import json
from pathlib import Path

from edgetune.cli import parser, run_main, stage, write_metrics
from edgetune.config import BadInput


ROLES = {"finetuned": "fine-tuned"}  # --model NAME -> the role its logged model is named by


def named_models(values: list[str]) -> dict[str, str]:
    """{'finetuned': 'models/finetuned/merged', ...} from the repeated --model NAME=DIR flags."""
    bad = [v for v in values if not v.partition("=")[0] or not v.partition("=")[2]]
    if bad:
        raise BadInput(f"--model: expected NAME=DIR (e.g. finetuned=models/finetuned/merged), got {bad[0]!r}")
    return dict(v.split("=", 1) for v in values)


def read_json(path: str, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: cannot read the {what} metrics ({e.__class__.__name__}); re-run that stage") from None


def measured_by_compress(path: str | None, compressed: str | None, params) -> dict | None:
    """The last compress step's measurement, when compress made one of the same model: steps
    measured (evaluate_steps) and not an adapter folder (there compress measures the base)."""
    from edgetune.models import is_adapter_folder

    if not (path and compressed and params.compress.steps and params.compress.evaluate_steps):
        return None
    if is_adapter_folder(compressed):
        return None
    steps = read_json(path, "compress").get("steps") or {}
    last = steps.get(f"{len(params.compress.steps) - 1}_{params.compress.steps[-1].method}")
    if not last or "score" not in last:
        return None
    return {k: v for k, v in last.items() if k not in ("method", "seconds")} | {"measured_by": "compress"}


def exported_files(folder: str | None, formats: list[str]) -> dict[str, Path]:
    """{format: its GGUF} for every export.formats entry; BadInput if the export stage left none."""
    if not (folder and formats):
        return {}
    files = {fmt: Path(folder) / fmt / "model.gguf" for fmt in formats}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise BadInput(f"{missing[0]}: not found (export.formats names it; re-run the export stage)")
    return files


def audit_model(folder: str, partitions: str | None, params) -> dict:
    """The memorization audit of the fine-tuned model (exposure per canary, membership AUC);
    write_metrics logs its numbers to this stage's MLflow run as audit.* metrics."""
    from edgetune.audit import AUDIT_DIR, measure
    from edgetune.models import load_hf
    from edgetune.tasks import get_task

    if not partitions:
        raise BadInput("audit.*: set, but evaluate was given no --partitions folder to read the canaries from")
    model, tok = load_hf(folder)
    return measure(model, tok, get_task(params.data.task), Path(partitions) / AUDIT_DIR, params.audit,
                   params.finetune.max_length)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="a model to evaluate, e.g. finetuned=models/finetuned/merged (repeatable)")
    p.add_argument("--zero-shot", help="the zeroshot stage's metrics (reported as 'base')")
    p.add_argument("--compress-metrics", help="the compress stage's metrics (its last step's "
                   "measurement stands for the 'compressed' model)")
    p.add_argument("--exported", help="the export stage's folder: each <format>/model.gguf is scored "
                   "inside its runtime (llama.cpp)")
    p.add_argument("--partitions", help="the partition stage's folder: with audit.* set, its audit/ "
                   "canaries and members are scored on the fine-tuned model (edgetune/audit.py)")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    models = named_models(args.model)
    folders = dict(models)
    inputs = [args.data, *models.values(), *filter(None, [args.zero_shot, args.compress_metrics, args.exported])]
    with stage("evaluate", args.params, inputs, [args.metrics]) as (params, _):
        from edgetune.evaluate import check_inputs, evaluate_isolated
        from edgetune.tracking import log_model

        check_inputs(args.data, models.values())
        exported = exported_files(args.exported, params.export.formats)
        results = {"base": read_json(args.zero_shot, "zeroshot")} if args.zero_shot else {}
        if not params.compress.steps and {"compressed", "finetuned"} <= models.keys():
            models.pop("compressed")  # no compression step: the folder is a copy, measure it once
            copy_of = "finetuned"
        else:
            copy_of = None
            reused = measured_by_compress(args.compress_metrics, models.get("compressed"), params)
            if reused:
                results["compressed"] = reused
                models.pop("compressed")
        for name, path in models.items():
            results[name] = evaluate_isolated(path, args.data, params.data.task, params.evaluate, name,
                                              runtime=params.model)
        if copy_of:
            results["compressed"] = results[copy_of]
        for fmt, path in exported.items():
            from edgetune.export.llamacpp import score_isolated

            results[fmt] = {**score_isolated(str(path), args.data, params.data.task, params.evaluate, fmt),
                            "runtime": "llama.cpp"}
        if "base" in results and "finetuned" in results:
            results["gain_over_zero_shot"] = results["finetuned"]["score"] - results["base"]["score"]
        if params.audit.enabled and "finetuned" in folders:
            results["audit"] = audit_model(folders["finetuned"], args.partitions, params)
        write_metrics(args.metrics, results)
        for name, folder in folders.items():
            log_model(ROLES.get(name, name), folder, results[name], params, f"{args.data}/eval.parquet")
        for fmt, path in exported.items():
            log_model(f"exported {fmt}", str(path.parent), results[fmt], params, f"{args.data}/eval.parquet")


if __name__ == "__main__":
    run_main(main)
