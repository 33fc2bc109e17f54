"""Time to accuracy: how the global model's dev accuracy grows with training seconds, client
steps and bytes exchanged, method by method (issue 22: the question a practitioner choosing a
method asks).

Every case runs through the real engine on the partition stage's clients; every `--eval-every`
rounds the global model is scored on the dev split (the scoring is not counted as training
time). Each point is logged to MLflow as step-indexed metrics of the case's child run
(dev_accuracy, dev_macro_f1, dev_predicted_share_<label>, round_gold_share_<label> of the
last round's clients, train_seconds, client_steps, megabytes: in the UI, pick train_seconds or
megabytes as a chart's x-axis), written to
benchmarks/results/<name>.json, and drawn in <name>.png (accuracy vs minutes, vs client
steps, vs MB, over zero-shot and the rate of always answering the majority label; below, the
share of rows answered with the base model's favourite label, against that label's gold share).

Long budgets resume: each case saves every round in benchmarks/.cache/tta/<name>/<label>
(federated/resume.py, keyed by the case's config), so a killed run, or a second run with a
larger --minutes or --rounds, goes on from the last round with the curve so far; a case that
already used its budget is not trained again (add cases to a finished command and re-run it).
Where that cache is gone (a fresh clone), `--merge` adds this call's cases to the committed
<name>.json and keeps the curves recorded there for the cases it does not run.
`--replot NAME` trains nothing: it draws <name>.json's cases (or the --methods ones) into
results/NAME.png.

    python -m benchmarks.time_to_accuracy --rounds 100 --local-steps 5 --eval-every 5 \
        --minutes 30 --name tta_sst2 --methods fedit fedkseed fedkseed-lora job mezo \
        --set fedkseed-lora:method=fedkseed --set fedkseed-lora:trainable=lora
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


DEFAULT_CASES = ["fedit", "fedkseed", "job", "mezo"]


class OutOfTime(Exception):
    """The case has used its --minutes of training time (its rounds are saved for resume)."""


class Curve:
    """One case's points, kept beside its resume state so a resumed run keeps the old ones."""

    def __init__(self, folder: Path):
        self.file = folder / "curve.json"
        self.points: list[dict] = json.loads(self.file.read_text()) if self.file.is_file() else []
        self.seconds = self.steps = self.bytes = 0.0

    def add_round(self, log, steps_per_client: int) -> None:
        """Running totals over rounds (restored rounds are passed again on resume)."""
        self.seconds += log.seconds
        self.steps += len(log.clients) * steps_per_client
        self.bytes += log.bytes_exchanged

    def record(self, rnd: int, metrics: dict[str, float], train_loss: float) -> dict:
        """One scoring: DevScorer.metrics (accuracy, macro-F1, predicted label shares), the
        clients of the round just aggregated with their rows' label mix, and totals."""
        point = {"round": rnd, **metrics, "train_seconds": self.seconds,
                 "client_steps": int(self.steps), "megabytes": self.bytes / 1e6, "train_loss": train_loss}
        self.points = [p for p in self.points if p["round"] < rnd] + [point]
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(self.points, indent=1))
        return point


def log_point(mlflow, point: dict) -> None:
    shares = {f"dev_{k}": v for k, v in point.items() if k.startswith("predicted_share_")}
    shares |= {k: v for k, v in point.items() if k.startswith("round_gold_share_")}
    mlflow.log_metrics({"dev_accuracy": point["accuracy"], "train_seconds": point["train_seconds"],
                        "client_steps": point["client_steps"], "megabytes": point["megabytes"],
                        **({"dev_macro_f1": point["macro_f1"]} if "macro_f1" in point else {}), **shares},
                       step=point["round"])


def accuracy_within(points: list[dict], minutes: float) -> float | None:
    """The last measured accuracy whose training time fits in `minutes` (equal-budget table)."""
    fitting = [p["accuracy"] for p in points if p["train_seconds"] <= minutes * 60]
    return fitting[-1] if fitting else None


def case_fingerprint(cfg, args) -> str:
    """What a case's cache is keyed by: its training config but the number of rounds (more
    rounds go on from the saved ones), the task and the partition files."""
    from edgetune.federated.resume import fingerprint

    shape = {k: v for k, v in cfg.training_key().items() if k != "num_rounds"}
    return fingerprint({"cfg": shape, "task": args.task}, [Path(args.partitions)])


def run_case(label, cfg, score, args, mlflow) -> list[dict]:
    """Train one case until its rounds or minutes run out, scoring every eval_every rounds
    (score: common.DevScorer, which also holds the model folder, task and clients)."""
    from benchmarks.common import round_label_mix
    from edgetune.federated.engine import run_federation
    from edgetune.federated.resume import ResumeFolder
    from edgetune.federated.setup import centralize, engine_options, prepare

    use, rate = score.clients, cfg.sample_rate
    if cfg.spec.centralized:  # mezo: the federation's step budget on pooled data
        use, rate, cfg = centralize(score.clients, cfg)
    folder = Path(args.cache) / args.name / label
    resume = ResumeFolder(folder, case_fingerprint(cfg, args))
    curve = Curve(folder)
    if curve.points and (curve.points[-1]["train_seconds"] >= args.minutes * 60
                         or curve.points[-1]["round"] >= cfg.num_rounds):
        for point in curve.points:  # done on an earlier run: nothing to train
            log_point(mlflow, point)
        return curve.points
    method, model = prepare(score.path, score.task, cfg, len(use), rate)
    per_client = cfg.local_steps * (cfg.zo.samples if cfg.spec.zo else 1)
    losses: dict[int, float] = {}
    mixes: dict[int, dict] = {}

    def on_round(log):
        curve.add_round(log, per_client)
        losses[log.round] = log.train_loss
        mixes[log.round] = {"round_clients": log.clients,
                            **round_label_mix(use, log.clients, score.task.label_words)}

    def on_global(rnd, state):
        out_of_time = curve.seconds >= args.minutes * 60 and rnd < cfg.num_rounds
        if rnd % args.eval_every == 0 or rnd == cfg.num_rounds or out_of_time:
            method.apply_global(model, state)
            point = curve.record(rnd, {**score.metrics(model, f"{label} round {rnd}"), **mixes[rnd]}, losses[rnd])
            log_point(mlflow, point)
            print(f"{label} round {rnd}: accuracy {point['accuracy']:.4f} (macro-F1 "
                  f"{point['macro_f1']:.4f}) after "
                  f"{point['train_seconds'] / 60:.1f} min, {point['client_steps']} client steps, "
                  f"{point['megabytes']:.2f} MB", flush=True)
        if out_of_time:
            raise OutOfTime

    for point in curve.points:  # what earlier runs of this case measured
        log_point(mlflow, point)
    try:
        run_federation(method, model, use, **engine_options(cfg, use), resume=resume, on_round=on_round,
                       on_global=on_global)
    except OutOfTime:
        pass
    return curve.points


def recorded_cases(path: Path, zero_shot: float, args) -> dict:
    """The cases of a committed results file that this call does not run (--merge); refused
    when that file scored another dev set (its zero-shot accuracy differs)."""
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())["results"]
    if abs(record["zero_shot"]["accuracy"] - zero_shot) > 1e-9:
        raise SystemExit(f"--merge: {path} was scored at zero-shot {record['zero_shot']['accuracy']:.4f}, "
                         f"this call at {zero_shot:.4f}: another task, model or dev split; use another --name")
    return {label: case for label, case in record.items()
            if label not in ("zero_shot", "at_equal_minutes") and label not in args.methods}


def plot(results: dict, zero: dict, n_eval: int, out: Path, max_steps: int | None = None) -> None:
    """Top row: accuracy against training minutes, client steps and MB, one line per case
    (points up to `max_steps` client steps, when given), over zero-shot (`zero`: the JSON's
    zero-shot record), its standard-error band and the majority-label rate (what always
    answering one label scores). Bottom row, when the points carry it: the share of dev rows
    the model answers with the zero-shot model's favourite label, against the gold share, so
    a gain that is only a moved label bias (or a case flipping between labels) shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share, word = favourite_label(zero)
    rows = [("accuracy", "dev accuracy")] + ([(share, f'share answered "{word}"')] if share else [])
    axes_of = [("train_seconds", "training minutes", 1 / 60, "linear"),
               ("client_steps", "client steps", 1, "linear"), ("megabytes", "MB exchanged", 1, "log")]
    fig, grid = plt.subplots(len(rows), 3, figsize=(15, 4.2 * len(rows)), sharey="row", squeeze=False)
    for axes, (metric, ylabel) in zip(grid, rows):
        for ax, (key, xlabel, scale, xscale) in zip(axes, axes_of):
            for i, (label, case) in enumerate(results.items()):
                pts = [p for p in case["curve"] if metric in p and (max_steps is None or p["client_steps"] <= max_steps)]
                whole = all(metric in p for p in case["curve"])  # older points may lack shares
                start = [(0.0, zero[metric])] if xscale != "log" and whole else []  # from the base model
                xy = start + [(p[key] * scale, p[metric]) for p in pts]
                if not xy:
                    continue
                colour = plt.cm.tab20.colors[(2 * i) % 20 + (2 * i) // 20 % 2]  # 20 cases, no colour twice
                ax.plot(*zip(*xy), marker="o", ms=3, label=label, color=colour)
            gold = reference_lines(ax, metric, zero, n_eval, word)
            ax.set_xlabel(xlabel)
            ax.set_xscale(xscale)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(ylabel)
    grid[0][0].legend(fontsize=8)
    if share and gold:
        grid[1][0].legend(handles=[gold], fontsize=8)
    fig.suptitle("Time to accuracy: global model on the whole dev split")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def favourite_label(zero: dict) -> tuple[str | None, str | None]:
    """(metric key, label word) of the label the zero-shot model answers most; (None, None) for
    a record without predicted shares (made before they were measured)."""
    shares = {k: v for k, v in zero.items() if k.startswith("predicted_share_")}
    if not shares:
        return None, None
    key = max(shares, key=shares.get)
    return key, key.removeprefix("predicted_share_")


def reference_lines(ax, metric: str, zero: dict, n_eval: int, word: str | None):
    """Accuracy: zero-shot with its band, and the majority-label rate. Share: the gold share of
    that label (when recorded), whose line is returned."""
    from benchmarks.common import draw_zero_shot

    if metric == "accuracy":
        draw_zero_shot(ax, zero["accuracy"], n_eval)
        if zero.get("majority_label_rate") is not None:
            ax.axhline(zero["majority_label_rate"], color="black", ls=":", lw=1, label="always the majority label")
    elif f"gold_share_{word}" in zero:
        return ax.axhline(zero[f"gold_share_{word}"], color="black", ls=":", lw=1,
                          label=f'dev rows whose gold label is "{word}"')
    return None


def replot(args) -> Path:
    """--replot: draw the --methods cases of results/<name>.json (all of them without
    --methods; up to --max-steps client steps) into results/<replot>.png, training and
    scoring nothing."""
    from benchmarks.common import RESULTS

    source = RESULTS / f"{args.name}.json"
    if not source.is_file():
        raise ValueError(f"--replot: {source} not found; run the cases with --name {args.name} first")
    record = json.loads(source.read_text())
    cases = {k: v for k, v in record["results"].items() if k not in ("zero_shot", "at_equal_minutes")}
    chosen = args.methods or list(cases)
    missing = [m for m in chosen if m not in cases]
    if missing:
        raise ValueError(f"--replot: {source} has no case {', '.join(missing)}; it has {', '.join(cases)}")
    out = RESULTS / f"{args.replot}.png"
    zero = record["results"]["zero_shot"]
    plot({m: cases[m] for m in chosen}, zero, record["params"]["eval_examples"], out, args.max_steps)
    return out


def main(argv=None) -> None:
    from benchmarks.common import case_arguments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    case_arguments(p, DEFAULT_CASES)
    p.set_defaults(methods=None)  # --replot draws every recorded case unless --methods names some
    p.add_argument("--rounds", type=int, default=100, help="most rounds per case")
    p.add_argument("--minutes", type=float, default=30.0, help="training minutes per case (scoring excluded)")
    p.add_argument("--eval-every", type=int, default=5, help="rounds between two scorings")
    p.add_argument("--cache", default="benchmarks/.cache/tta", help="resume state and curves per case")
    p.add_argument("--name", default="tta_sst2")
    p.add_argument("--merge", action="store_true",
                   help="keep the cases of an existing results/<name>.json that this call does not run")
    p.add_argument("--replot", metavar="NAME", help="train nothing: draw the cases of results/<name>.json "
                   "(all, or the --methods ones) into results/NAME.png")
    p.add_argument("--max-steps", type=int, help="--replot: draw points up to this many client steps")
    args = p.parse_args(argv)
    if args.replot:
        try:
            print(replot(args))
        except ValueError as e:
            p.error(str(e))  # exit code 2
        return

    from benchmarks.common import RESULTS, DevScorer, method_config, parse_overrides, save, standard_error
    from edgetune import tracking

    args.methods = args.methods or DEFAULT_CASES
    score = DevScorer(args)
    params, zero_shot = score.params, score.zero_shot
    kept = recorded_cases(RESULTS / f"{args.name}.json", zero_shot, args) if args.merge else {}
    budget = {"num_rounds": args.rounds, **({"local_steps": args.local_steps} if args.local_steps else {})}
    overrides = parse_overrides(args.set)
    mlflow = tracking.configure("edgetune-benchmarks")
    results = {}
    with mlflow.start_run(run_name=f"{args.name} curves", tags={"edgetune.benchmark": args.name}):
        for label in args.methods:
            cfg = method_config(params.finetune, label, budget, overrides)
            with mlflow.start_run(run_name=label, nested=True, tags={"edgetune.benchmark": args.name}):
                mlflow.log_params({"method": cfg.method, "trainable": cfg.trainable_set,
                                   "overrides": " ".join(s for s in args.set if s.startswith(f"{label}:")),
                                   **cfg.resolved()})
                t0 = time.perf_counter()
                points = run_case(label, cfg, score, args, mlflow)
            results[label] = {
                "method": cfg.method, "trainable": cfg.trainable_set, "curve": points,
                "final_accuracy": points[-1]["accuracy"], "best_accuracy": max(p["accuracy"] for p in points),
                **({"final_macro_f1": points[-1]["macro_f1"]} if "macro_f1" in points[-1] else {}),
                "gain_points": 100 * (points[-1]["accuracy"] - zero_shot),
                "train_minutes": points[-1]["train_seconds"] / 60, "client_steps": points[-1]["client_steps"],
                "megabytes": points[-1]["megabytes"], "wall_minutes_this_run": (time.perf_counter() - t0) / 60,
                "lr": cfg.zo_lr if cfg.spec.zo else cfg.client_lr, **({"eps": cfg.zo_eps, "lr_decay_rounds": cfg.zo_decay_rounds} if cfg.spec.zo else {}),
                "overrides": " ".join(s for s in args.set if s.startswith(f"{label}:")),
                "partitions": args.partitions,  # cases merged from calls on other clients say so
            }
    results = {**kept, **results}
    budgets = sorted({5, 10, 15, 20, 30, 60, 90, args.minutes})
    table = {label: {f"{m:g} min": accuracy_within(r["curve"], m) for m in budgets} for label, r in results.items()}
    png = RESULTS / f"{args.name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    n_eval = len(score.prompts)
    zero = {**score.zero_shot_metrics, "standard_error": standard_error(zero_shot, n_eval),
            "majority_label_rate": score.majority_rate, **score.gold_shares}
    plot(results, zero, n_eval, png)
    out = save(args.name, {"zero_shot": zero, **results, "at_equal_minutes": table},
               {"model": score.path, "task": args.task, "eval_examples": n_eval, "rounds": args.rounds,
                "minutes": args.minutes, "eval_every": args.eval_every, "methods": ",".join(results),
                "local_steps": args.local_steps or params.finetune.local_steps,
                "overrides": " ".join(r["overrides"] for r in results.values() if r["overrides"])},
               artifacts=[png])
    print(json.dumps(table, indent=1))
    print(out)


if __name__ == "__main__":
    main()
