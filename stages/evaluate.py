"""evaluate: the task's metric (accuracy, EM / F1, ROUGE-L), WikiText-2 perplexity, size,
latency and peak memory of the base (zero-shot), fine-tuned and compressed models, each in its
own process."""


from edgetune.cli import parser, run_main, stage, write_metrics


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="a model to evaluate, e.g. base=models/base (repeatable)")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model)
    with stage("evaluate", args.params, [args.data, *models.values()], [args.metrics]) as (params, _):
        from edgetune.evaluate import evaluate_isolated

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
