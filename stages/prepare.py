"""prepare: load the task's train/eval splits (hub or local mirror) as prompt + label Parquet,
plus the WikiText-2 test text (perplexity) and validation text (calibration)."""

from pathlib import Path

from edgetune.cli import parser, run_main, stage, write_metrics


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="folder for train.parquet, eval.parquet, wikitext2_{test,valid}.txt")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    with stage("prepare", args.params, [], [args.out, args.metrics], section="data") as (params, _):
        from edgetune.tasks import get_task, resolve_mirror
        from edgetune.tasks.wikitext2 import load_text

        cfg = params.data
        task, mirror = get_task(cfg.task), resolve_mirror(cfg.mirror)
        train_split, eval_split = task.splits
        train = task.load(train_split, mirror)
        evals = task.load(eval_split, mirror)
        if cfg.max_train and cfg.max_train < len(train):
            train = train.shuffle(seed=cfg.seed).select(range(cfg.max_train))
        if cfg.max_eval and cfg.max_eval < len(evals):
            evals = evals.shuffle(seed=cfg.seed).select(range(cfg.max_eval))
        out = Path(args.out)
        out.mkdir(parents=True)
        train.to_parquet(out / "train.parquet")
        evals.to_parquet(out / "eval.parquet")
        for split, name in (("test", "wikitext2_test.txt"), ("validation", "wikitext2_valid.txt")):
            (out / name).write_text(load_text(split, mirror), encoding="utf-8")
        write_metrics(args.metrics, {"train_rows": len(train), "eval_rows": len(evals),
                                     "source": "mirror" if mirror else "hub"})


if __name__ == "__main__":
    run_main(main)
