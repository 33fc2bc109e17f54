"""Comparison tables and plots read from MLflow, shared by flows/benchmark.py and
notebooks/compare_experiments.ipynb (one source of truth: the runs, not files beside them).

- `pipeline_runs`: one row per finished pipeline run (its params, headline metrics, tags).
- `table_one`: the survey's Table I in small — per method: trainable parameters, bytes per
  client per round, peak fine-tuning memory (and its ratio to inference), optimizer.
- `table_two`: the survey's Table II — score per task (accuracy, SQuAD/DROP F1, ROUGE-L) of
  zero-shot and of each method.
- `plot_loss_curves`: Fig. 3 — running average of the training loss per round, per method.
- `plot_score_vs_bytes`: score against bytes per client per round (log scale).
"""

from __future__ import annotations

import pandas as pd

from edgetune.federated import registry
COLUMNS = {  # short name -> MLflow column of the pipeline run
    "label": "tags.edgetune.cell",
    "method": "tags.edgetune.method",
    "task": "tags.edgetune.task",
    "trainable": "params.finetune.trainable",
    "partition": "params.partition.scheme",
    "compress": "tags.edgetune.compress",
    "score_zero_shot": "metrics.score_zero_shot",
    "score_finetuned": "metrics.score_finetuned",
    "score_compressed": "metrics.score_compressed",
    "bytes_per_client_round": "metrics.bytes_per_client_round",
    "trainable_params": "metrics.finetune.trainable_params",
    "peak_rss_mb_finetune": "metrics.peak_rss_mb_finetune",
    "peak_rss_mb_inference": "metrics.evaluate.base.peak_rss_mb",
    "peak_gpu_mb_finetune": "metrics.finetune.peak_gpu_mb",  # model.device cuda only
    "peak_gpu_mb_inference": "metrics.evaluate.base.peak_gpu_mb",
    "finetune_seconds": "metrics.finetune.seconds",
    "size_mb_compressed": "metrics.size_mb_compressed",
}


def pipeline_runs(experiment: str, grid: str | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    """Finished `pipeline` runs of `experiment` (of one grid when `grid` is given), newest
    first, with the columns of COLUMNS (missing ones are NaN)."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    query = "tags.`edgetune.stage` = 'pipeline' and attributes.status = 'FINISHED'"
    if grid:
        query += f" and tags.`edgetune.grid` = '{grid}'"
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=query,
                              order_by=["attributes.start_time DESC"])
    frame = pd.DataFrame({"run_id": runs.get("run_id", pd.Series(dtype=str))})
    for short, column in COLUMNS.items():
        frame[short] = runs[column] if column in runs else None
    frame["label"] = frame["label"].fillna(frame["method"])
    return frame.drop_duplicates(["label", "task"]).reset_index(drop=True)  # newest per cell


def table_one(runs: pd.DataFrame) -> pd.DataFrame:
    """Memory and communication per method label (the first task each label ran on)."""
    rows = runs.sort_values("task").drop_duplicates("label")
    zo = set(registry.zo_methods())
    out = pd.DataFrame({
        "method": rows["label"],
        "exchanges": rows["method"].map(lambda m: "seeds + scalars" if m in zo else "weights"),
        "optimizer": rows["method"].map(lambda m: "ZO-SGD (forward only)" if m in zo else "AdamW (backprop)"),
        "trainable params": rows["trainable_params"],
        "bytes / client / round": rows["bytes_per_client_round"],
        "peak fine-tuning RSS (MB)": rows["peak_rss_mb_finetune"],
        "÷ inference RSS": rows["peak_rss_mb_finetune"] / rows["peak_rss_mb_inference"],
    })
    gpu = rows["peak_gpu_mb_finetune"]
    if gpu.notna().any():  # runs on CUDA: peak GPU memory allocated, as GPU users read it
        train = pd.to_numeric(gpu).fillna(rows["peak_rss_mb_finetune"])
        infer = pd.to_numeric(rows["peak_gpu_mb_inference"]).fillna(rows["peak_rss_mb_inference"])
        out = out.drop(columns=["peak fine-tuning RSS (MB)", "÷ inference RSS"]).assign(**{
            "peak fine-tuning memory (MB; GPU allocated, else RSS)": train.to_numpy(),
            "÷ inference memory": (train / infer).to_numpy()})
    return out.sort_values("bytes / client / round").reset_index(drop=True)


def table_two(runs: pd.DataFrame) -> pd.DataFrame:
    """Score per task: a zero-shot row, then one row per method label."""
    scores = runs.pivot_table(index="label", columns="task", values="score_finetuned", aggfunc="first")
    zero = runs.groupby("task")["score_zero_shot"].first().to_frame("zero-shot").T
    return pd.concat([zero, scores]).rename_axis("method").rename_axis(None, axis=1)


def to_markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    def cell(v):
        if isinstance(v, float):
            return "" if pd.isna(v) else (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}")
        return str(v)

    frame = frame.reset_index() if frame.index.name else frame
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def loss_curves(runs: pd.DataFrame) -> dict[tuple[str, str], list[float]]:
    """(task, label) -> train loss per round, from each pipeline run's finetune child run."""
    import mlflow

    client = mlflow.MlflowClient()
    curves = {}
    for row in runs.itertuples():
        children = client.search_runs(
            [client.get_run(row.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{row.run_id}' and tags.`edgetune.stage` = 'finetune'")
        if children:
            history = client.get_metric_history(children[0].info.run_id, "train_loss")
            curves[(row.task, row.label)] = [m.value for m in sorted(history, key=lambda m: m.step)]
    return curves


def plot_loss_curves(curves: dict[tuple[str, str], list[float]], path) -> None:
    """Fig. 3 of the survey: running average of the training loss, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted({t for t, _ in curves})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4.5 * max(len(tasks), 1), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, label), losses in sorted(curves.items()):
            if t == task and losses:
                running = np.cumsum(losses) / np.arange(1, len(losses) + 1)
                ax.plot(range(1, len(losses) + 1), running, marker="o", markersize=3, label=label)
        ax.set_title(task)
        ax.set_xlabel("round")
        ax.set_ylabel("running mean of train loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_score_vs_bytes(runs: pd.DataFrame, path) -> None:
    """Fine-tuned score against bytes per client per round (log x), one marker per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for task, rows in runs.groupby("task"):
        ax.scatter(rows["bytes_per_client_round"], rows["score_finetuned"], label=task)
        for r in rows.itertuples():
            ax.annotate(r.label, (r.bytes_per_client_round, r.score_finetuned), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per client per round (up + down)")
    ax.set_ylabel("score after fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
