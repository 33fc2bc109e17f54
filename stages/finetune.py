"""finetune: federated fine-tuning of the base model over the client partitions.

Killed at any point (even kill -9), a re-run resumes after the last completed round from
`<out>.resume/` (edgetune/federated/resume.py) and ends bit-identical to an uninterrupted run;
the killed attempt's MLflow run is marked KILLED and the new one tagged edgetune.resumed_from_round.
"""

import resource
from pathlib import Path

from edgetune.cli import parser, run_main, stage, write_metrics


def open_resume(args, params, run_id: str):
    """The stage's resume folder, keyed by the params and inputs that shape training; closes
    the run of a killed attempt and tags this run with the round it resumes after."""
    import mlflow

    from edgetune.federated.resume import ResumeFolder, fingerprint
    from edgetune.tracking import close_stale_run

    key = fingerprint({"finetune": params.finetune.training_key(), "task": params.data.task},
                      [Path(args.model), Path(args.partitions)])
    resume = ResumeFolder.beside(Path(args.out), key)
    if resume.previous_run and resume.previous_run != run_id:
        close_stale_run(resume.previous_run, run_id)
    resume.record_run(run_id)
    if resume.last_round():
        mlflow.set_tag("edgetune.resumed_from_round", resume.last_round())
    return resume


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="base HF folder")
    p.add_argument("--partitions", required=True, help="folder of client_<i>.parquet")
    p.add_argument("--out", required=True, help="folder for adapter/, merged/, checkpoint/")
    p.add_argument("--plots", required=True, help="folder for rounds.csv and loss.png")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    outs = [args.out, args.plots, args.metrics]
    with stage("finetune", args.params, [args.model, args.partitions], outs) as (params, run):
        import mlflow

        from edgetune.federated.train import finetune, plot_history
        from edgetune.tracking import log_datasets

        resume = open_resume(args, params, run.info.run_id)
        mlflow.log_params(params.finetune.resolved())  # what finetune.lr / zo.lr: auto stood for

        def log_round(r):
            mlflow.log_metrics(r.metrics(), step=r.round)

        summary, history = finetune(Path(args.model), Path(args.partitions), params.data.task,
                                    params.finetune, Path(args.out), on_round=log_round, resume=resume,
                                    runtime=params.model)
        # Peak resident memory of this process (model, method state, activations, optimizer);
        # on Flower the largest ClientApp process's, measured there.
        summary.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        plots = Path(args.plots)
        plots.mkdir(parents=True)
        plot_history(history, plots / "loss.png", plots / "rounds.csv")
        mlflow.log_artifacts(str(plots), "plots")
        mlflow.set_tag("edgetune.model_path", str(Path(args.out) / "merged"))
        log_datasets(mlflow.MlflowClient(), run.info.run_id, {"partitions": (args.partitions, "training")},
                     params.data.task)
        write_metrics(args.metrics, summary)
        resume.remove()


if __name__ == "__main__":
    run_main(main)
