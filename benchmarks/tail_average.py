"""Tail averaging on a time-to-accuracy curve: at each scored round R of a finished case, the
mean of its last k rounds' global models (`finetune.zo.average_rounds: k`, the model the
finetune stage would save had it stopped at R) against the last round's model alone (issue 22).

Nothing is trained: the case's (seed, scalar) history is read from the time-to-accuracy cache
(benchmarks/.cache/tta/<name>/<label>, which the case's config must match) and replayed round
by round; at each chosen round the stage's own `average_last_rounds` builds the mean, it is
scored on the whole dev split (accuracy, macro-F1, predicted label shares), and the weights go back to round R's. Each point is kept in
<label>/average-<k>.json beside the cache, so a killed run goes on where it stopped. Writes
benchmarks/results/<name>_average.{json,png} and an MLflow run in `edgetune-benchmarks`.

    python -m benchmarks.tail_average --name tta_sst2_long --average 50 --every 20 --from 100 \
        --methods fedkseed-3e-5 --set fedkseed-3e-5:method=fedkseed \
        --set fedkseed-3e-5:zo.distribution=rademacher --set fedkseed-3e-5:zo.lr=3e-5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def cached_history(folder: Path, cfg, args) -> tuple[dict, list[dict]]:
    """(saved global state, curve points) of a case the time-to-accuracy benchmark finished,
    refused (exit 2) if it is missing or was trained under another config."""
    from benchmarks.time_to_accuracy import case_fingerprint

    stamp, saves = folder / "fingerprint", sorted(folder.glob("round-*.pt"))
    if not saves or not stamp.is_file():
        sys.exit(f"error: {folder}: no time-to-accuracy history; run benchmarks.time_to_accuracy "
                 "with the same --name, --methods and --set first")
    if stamp.read_text() != case_fingerprint(cfg, args):
        sys.exit(f"error: {folder} was trained under another config than --set gives for this case "
                 "(compare with the time-to-accuracy command in benchmarks/README.md)")
    return torch.load(saves[-1], weights_only=False)["state"], json.loads((folder / "curve.json").read_text())


def chosen_rounds(points: list[dict], start: int, every: int) -> list[int]:
    """The scored rounds from `start` on, every `every` rounds, and always the last one."""
    rounds = [p["round"] for p in points if p["round"] >= start]
    return sorted({r for r in rounds if (r - start) % every == 0} | set(rounds[-1:]))


def average_curve(label, cfg, score, args) -> tuple[list[dict], list[dict]]:
    """Replay the case's history once; at each chosen round score the mean of the last k models.
    Returns those points and the case's whole last-round curve (score: common.DevScorer)."""
    from edgetune.federated import zo
    from edgetune.federated.setup import centralize, prepare

    clients = score.clients
    if cfg.spec.centralized:  # mezo: keyed and trained as the time-to-accuracy run did
        clients, _, cfg = centralize(clients, cfg)
    folder = Path(args.cache) / args.name / label
    state, curve = cached_history(folder, cfg, args)
    method, model = prepare(score.path, score.task, cfg, len(clients), cfg.sample_rate)
    rounds = method.history(state)
    last_of = {p["round"]: p for p in curve}
    done_file = folder / f"average-{args.average}.json"
    done = {p["round"]: p for p in json.loads(done_file.read_text())} if done_file.is_file() else {}
    at = 0
    for r in chosen_rounds(curve, args.start, args.every):
        if r in done:
            continue
        for s in range(at, r):
            zo.replay(method.params, *rounds[s], cfg.zo_lr_at(s), cfg.weight_decay, method.sampler)
        at = r
        with zo.restored(method.params):
            method.average_last_rounds(rounds[:r], args.average)
            averaged = score.metrics(model, f"{label} round {r}, mean of {args.average}")
        done[r] = {**last_of[r], "last_accuracy": last_of[r]["accuracy"],
                   **{f"averaged_{k}": v for k, v in averaged.items()}}  # accuracy, macro-F1, shares
        done_file.write_text(json.dumps(sorted(done.values(), key=lambda p: p["round"]), indent=1))
        print(f"{label} round {r}: last {last_of[r]['accuracy']:.4f}, mean of last {args.average} "
              f"{averaged['accuracy']:.4f} (macro-F1 {averaged['macro_f1']:.4f})", flush=True)
    return sorted(done.values(), key=lambda p: p["round"]), curve


def summary(points: list[dict], zero_shot: float) -> dict:
    """Level and swing of both curves over the chosen rounds, in accuracy and points over zero-shot."""
    out = {}
    for key in ("last_accuracy", "averaged_accuracy"):
        values = [p[key] for p in points]
        out[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                    "min_gain_points": 100 * (min(values) - zero_shot),
                    "mean_gain_points": 100 * (sum(values) / len(values) - zero_shot)}
    return out


def plot(results: dict, zero_shot: float, n_eval: int, k: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import draw_zero_shot

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for label, case in results.items():
        every = case["last_round_curve"]
        line, = ax.plot([p["client_steps"] for p in every], [p["accuracy"] for p in every], ls=":",
                        marker="o", ms=3, label=f"{label}: last round's model")
        ax.plot([p["client_steps"] for p in case["curve"]], [p["averaged_accuracy"] for p in case["curve"]],
                color=line.get_color(), marker="s", ms=6, label=f"{label}: mean of last {k} rounds' models")
    draw_zero_shot(ax, zero_shot, n_eval)
    ax.axhline(zero_shot + 0.05, color="grey", ls=":", lw=1, label="zero-shot + 5 points")
    ax.set_xlabel("client steps")
    ax.set_ylabel("dev accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Tail averaging (finetune.zo.average_rounds) on the time-to-accuracy runs")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def replot(name: str) -> Path | None:
    """Redraw results/<name>_average.png from its JSON (None when there is no JSON)."""
    from benchmarks.common import RESULTS

    source = RESULTS / f"{name}_average.json"
    if not source.is_file():
        return None
    record = json.loads(source.read_text())
    cases = {k: v for k, v in record["results"].items() if k != "zero_shot"}
    out = source.with_suffix(".png")
    plot(cases, record["results"]["zero_shot"]["accuracy"], record["params"]["eval_examples"],
         record["params"]["average_rounds"], out)
    return out


def main(argv=None) -> None:
    from benchmarks.common import case_arguments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    case_arguments(p, ["fedkseed"])
    p.add_argument("--name", default="tta_sst2_long", help="the time-to-accuracy run whose cases to read")
    p.add_argument("--cache", default="benchmarks/.cache/tta")
    p.add_argument("--average", type=int, default=50, help="k: rounds whose global models are averaged")
    p.add_argument("--from", dest="start", type=int, default=100, help="first scored round to average at")
    p.add_argument("--every", type=int, default=20, help="rounds between two averaged scorings")
    p.add_argument("--replot", action="store_true",
                   help="train and score nothing: redraw results/<name>_average.png from its JSON")
    args = p.parse_args(argv)
    if args.replot:
        out = replot(args.name)
        if out is None:
            p.error(f"--replot: results/{args.name}_average.json not found")  # exit code 2
        print(out)
        return

    from benchmarks.common import RESULTS, DevScorer, method_config, parse_overrides, save, standard_error

    score = DevScorer(args)
    params, zero_shot = score.params, score.zero_shot
    budget = {"num_rounds": 10_000, **({"local_steps": args.local_steps} if args.local_steps else {})}
    overrides, results = parse_overrides(args.set), {}
    for label in args.methods:
        cfg = method_config(params.finetune, label, budget, overrides)
        points, every = average_curve(label, cfg, score, args)
        results[label] = {"curve": points, **summary(points, zero_shot), "last_round_curve": every,
                          "overrides": " ".join(s for s in args.set if s.startswith(f"{label}:"))}
    name = f"{args.name}_average"
    png = RESULTS / f"{name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    n_eval = len(score.prompts)
    plot(results, zero_shot, n_eval, args.average, png)
    zero = {**score.zero_shot_metrics, "standard_error": standard_error(zero_shot, n_eval),
            "majority_label_rate": score.majority_rate, **score.gold_shares}
    out = save(name, {"zero_shot": zero, **results},
               {"tta_name": args.name, "average_rounds": args.average, "from_round": args.start,
                "every": args.every, "eval_examples": n_eval, "methods": ",".join(args.methods),
                "overrides": " ".join(args.set)}, artifacts=[png])
    print(json.dumps({label: {k: v for k, v in r.items() if "curve" not in k} for label, r in results.items()},
                     indent=1))
    print(out)


if __name__ == "__main__":
    main()
