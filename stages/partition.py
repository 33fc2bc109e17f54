"""partition: split the prepared train split over simulated clients (flwr-datasets); with
audit.* set, plant the memorization audit's canaries and hold its non-members out (audit.py)."""

import json
from pathlib import Path

from edgetune.cli import parser, run_main, stage, write_metrics


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data folder (train.parquet)")
    p.add_argument("--out", required=True, help="folder for client_<i>.parquet + stats.json")
    p.add_argument("--plot", required=True, help="PNG heatmap of label share per client")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    train_file = str(Path(args.data) / "train.parquet")
    with stage("partition", args.params, [train_file], [args.out, args.plot, args.metrics]) as (params, run):
        import datasets
        import mlflow

        from edgetune.partition import client_stats, partition, plot_label_share
        from edgetune.tasks.base import require_parquet
        from edgetune.tracking import log_datasets

        train = datasets.Dataset.from_parquet(str(require_parquet(train_file)))
        out = Path(args.out)
        if params.audit.enabled:  # non-members held out before partitioning, canaries planted after
            from edgetune.audit import audited_partition
            from edgetune.tasks import get_task

            target = get_task(params.data.task).target_column
            clients = audited_partition(train, params.partition, params.audit, target, out)
        else:
            clients = partition(train, params.partition)
        out.mkdir(parents=True, exist_ok=True)
        for i, client in enumerate(clients):
            client.to_parquet(out / f"client_{i:04d}.parquet")
        by = params.partition.by
        stats = client_stats(clients, by if by in train.column_names else None)
        (out / "stats.json").write_text(json.dumps(stats, indent=2))
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_label_share(stats, args.plot)
        mlflow.log_artifact(str(out / "stats.json"))
        log_datasets(mlflow.MlflowClient(), run.info.run_id, {"partitions": (out, "training")}, params.data.task)
        mlflow.log_artifact(args.plot)
        write_metrics(args.metrics, {k: stats[k] for k in ("num_clients", "total", "min_size", "max_size")})


if __name__ == "__main__":
    run_main(main)
