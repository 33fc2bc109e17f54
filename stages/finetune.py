"""finetune: federated fine-tuning of the base model over the client partitions."""

import resource
from pathlib import Path

from edgetune.cli import parser, run_main, stage, write_metrics


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="base HF folder")
    p.add_argument("--partitions", required=True, help="folder of client_<i>.parquet")
    p.add_argument("--out", required=True, help="folder for adapter/, merged/, checkpoint/")
    p.add_argument("--plots", required=True, help="folder for rounds.csv and loss.png")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    outs = [args.out, args.plots, args.metrics]
    with stage("finetune", args.params, [args.model, args.partitions], outs) as (params, _):
        import mlflow

        from edgetune.federated.train import finetune, plot_history

        def log_round(r):
            mlflow.log_metrics(r.metrics(), step=r.round)

        summary, history = finetune(Path(args.model), Path(args.partitions), params.data.task,
                                    params.finetune, Path(args.out), on_round=log_round)
        # Peak resident memory of this process (model, method state, activations, optimizer).
        summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        plots = Path(args.plots)
        plots.mkdir(parents=True)
        plot_history(history, plots / "loss.png", plots / "rounds.csv")
        mlflow.log_artifacts(str(plots), "plots")
        mlflow.set_tag("edgetune.model_path", str(Path(args.out) / "merged"))
        write_metrics(args.metrics, summary)


if __name__ == "__main__":
    run_main(main)
