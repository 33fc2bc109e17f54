"""evaluate: the task's metric (accuracy, EM / F1, ROUGE-L), WikiText-2 perplexity, size,
latency and peak memory of the base (zero-shot), fine-tuned and compressed models, each in its
own process."""


from pathlib import Path

from edgetune.cli import parser, run_main, stage, write_metrics
from edgetune.config import BadInput


def named_models(values: list[str]) -> dict[str, str]:
    """{'base': 'models/base', ...} from the repeated --model NAME=DIR flags."""
    bad = [v for v in values if not v.partition("=")[0] or not v.partition("=")[2]]
    if bad:
        raise BadInput(f"--model: expected NAME=DIR (e.g. base=models/base), got {bad[0]!r}")
    return dict(v.split("=", 1) for v in values)


def check_inputs(data: str, models: dict[str, str]) -> None:
    """Every model an HF folder and the prepared files readable, before any process is spawned
    (an error inside the evaluation process would arrive as a traceback)."""
    from edgetune.models import model_folder
    from edgetune.tasks.base import require_parquet

    require_parquet(Path(data) / "eval.parquet")
    text = Path(data) / "wikitext2_test.txt"
    if not text.is_file():
        raise BadInput(f"{text}: file not found (re-run the prepare stage)")
    for path in models.values():
        model_folder(path)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="a model to evaluate, e.g. base=models/base (repeatable)")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    models = named_models(args.model)
    with stage("evaluate", args.params, [args.data, *models.values()], [args.metrics]) as (params, _):
        from edgetune.evaluate import evaluate_isolated

        check_inputs(args.data, models)
        same_as_finetuned = not params.compress.steps and {"compressed", "finetuned"} <= models.keys()
        results = {name: evaluate_isolated(path, args.data, params.data.task, params.evaluate, name)
                   for name, path in models.items() if not (same_as_finetuned and name == "compressed")}
        if same_as_finetuned:  # no compression step: the compressed folder is a copy, measure it once
            results["compressed"] = results["finetuned"]
        if "base" in results and "finetuned" in results:
            results["gain_over_zero_shot"] = results["finetuned"]["score"] - results["base"]["score"]
        write_metrics(args.metrics, results)


if __name__ == "__main__":
    run_main(main)
