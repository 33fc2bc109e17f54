"""prepare: load the task's train/eval splits (packaged with edgetune, hub or local mirror: see
data.source) as prompt + label Parquet, plus the WikiText-2 test text (perplexity) and
validation text (calibration). Logs which source and which file hashes it used."""

import hashlib
from pathlib import Path

from edgetune.cli import parser, run_main, stage, write_metrics


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="folder for train.parquet, eval.parquet, wikitext2_{test,valid}.txt")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    with stage("prepare", args.params, [], [args.out, args.metrics], section="data") as (params, run):
        import mlflow

        from edgetune.tasks import get_task, resolve_source
        from edgetune.tracking import log_datasets
        from edgetune.tasks.wikitext2 import load_text

        cfg = params.data
        task = get_task(cfg.task)
        source = resolve_source(cfg.source, cfg.mirror, task.has_packaged)
        text_source = resolve_source(cfg.source, cfg.mirror, has_packaged=True)
        print(f"prepare: {cfg.task} from {source.describe()}, WikiText-2 from {text_source.describe()}")
        train_split, eval_split = task.splits
        train = task.load(train_split, source)
        evals = task.load(eval_split, source)
        if cfg.max_train and cfg.max_train < len(train):
            train = train.shuffle(seed=cfg.seed).select(range(cfg.max_train))
        if cfg.max_eval and cfg.max_eval < len(evals):
            evals = evals.shuffle(seed=cfg.seed).select(range(cfg.max_eval))
        out = Path(args.out)
        out.mkdir(parents=True)
        train.to_parquet(out / "train.parquet")
        evals.to_parquet(out / "eval.parquet")
        for split, name in (("test", "wikitext2_test.txt"), ("validation", "wikitext2_valid.txt")):
            (out / name).write_text(load_text(split, text_source), encoding="utf-8")
        hashes = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}
        mlflow.set_tags({"edgetune.data.source": source.describe(),
                         "edgetune.data.text_source": text_source.describe(),
                         **{f"edgetune.data.sha256.{k}": v for k, v in hashes.items()}})
        log_datasets(mlflow.MlflowClient(), run.info.run_id, {
            "train": (out / "train.parquet", "training"), "eval": (out / "eval.parquet", "evaluation")}, cfg.task)
        write_metrics(args.metrics, {"train_rows": len(train), "eval_rows": len(evals),
                                     "source": source.kind, "text_source": text_source.kind,
                                     "sha256": hashes})


if __name__ == "__main__":
    run_main(main)
