"""zeroshot: the base model's scores before any fine-tuning (the task's metric, WikiText-2
perplexity, size, latency, peak memory). Its own stage: it depends only on the model, the data
and the evaluate knobs, so a sweep over finetune.* or compress.* never re-scores it."""

from edgetune.cli import parser, run_main, stage, write_metrics


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--model", required=True, help="base HF folder")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    with stage("zeroshot", args.params, [args.data, args.model], [args.metrics], section="evaluate") as (params, _):
        from edgetune.evaluate import check_inputs, evaluate_isolated
        from edgetune.tracking import log_model

        check_inputs(args.data, [args.model])
        metrics = evaluate_isolated(args.model, args.data, params.data.task, params.evaluate, "zero-shot",
                                    runtime=params.model)
        write_metrics(args.metrics, metrics)
        log_model("zero-shot", args.model, metrics, params, f"{args.data}/eval.parquet")


if __name__ == "__main__":
    run_main(main)
