"""Does a federated model just follow the label mix of its last round? For each case of a
time-to-accuracy run (results/<name>.json), the share of dev rows answered with the base
model's favourite label at each scoring, against that label's share among the rows of the
clients aggregated in the round just before it; per case, their Pearson correlation.

Under label skew (Dirichlet clients), a global model that tracks the last round's mix, and
not the task, flips between labels from round to round (docs/results.md, QNLI). Nothing is
trained or scored: a point's clients are read from the curve (`round_clients`, recorded since
this script exists) or, for older points, the engine's client sampling is replayed from the
case's seed and sample rate (exact without dropouts or retries, which such cases refuse).
Writes results/<name>_label_mix.{json,png} and an MLflow run in `edgetune-benchmarks`.

    python -m benchmarks.label_mix --name tta_qnli --params /tmp/qnli/params.yaml \\
        --methods fedit fedit-prox fedit-all fedit-iid
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def sampled_clients(cfg, num_clients: int, rounds: int) -> dict[int, list[int]]:
    """round -> the clients run_federation samples in it (engine.sample_clients on the
    generator it seeds with finetune.seed; attempt 0 of every round)."""
    import numpy as np

    from edgetune.federated.engine import sample_clients

    rng = np.random.default_rng(cfg.seed)
    return {r: sample_clients(rng, num_clients, cfg.sample_rate) for r in range(1, rounds + 1)}


def case_points(label: str, case: dict, cfg, word: str, label_words) -> list[dict]:
    """(round, predicted share, round gold share) of every scoring that records the share."""
    from benchmarks.common import round_label_mix
    from edgetune.federated.setup import load_clients

    if "partitions" not in case:
        raise ValueError(f"{label}: the case does not record its partitions folder (run before "
                         "cases recorded it); re-run it with benchmarks.time_to_accuracy --merge")
    clients = load_clients(Path(case["partitions"]))
    scored = [p for p in case["curve"] if f"predicted_share_{word}" in p]
    replayed = None
    if any("round_clients" not in p for p in scored):
        if cfg.dropout:
            raise ValueError(f"{label}: its points do not record round_clients, and with dropouts "
                             "(finetune.dropout) the sampling cannot be replayed exactly")
        replayed = sampled_clients(cfg, len(clients), max(p["round"] for p in scored))
    out = []
    for p in scored:
        ids = p.get("round_clients") or replayed[p["round"]]
        mix = round_label_mix(clients, ids, label_words)[f"round_gold_share_{word}"]
        out.append({"round": p["round"], "round_clients": ids, "predicted_share": p[f"predicted_share_{word}"],
                    "round_gold_share": mix, "accuracy": p["accuracy"]})
    return out


def kept_cases(previous: Path, cases: dict, methods: list[str] | None) -> dict:
    """With --methods, the other cases of an earlier label-mix file (still in the run's JSON),
    so re-running a subset updates those cases and does not drop the rest."""
    if not methods or not previous.is_file():
        return {}
    earlier = json.loads(previous.read_text())["results"]
    return {k: v for k, v in earlier.items() if k in cases and k not in methods}


def correlation(points: list[dict]) -> float | None:
    """Pearson r of predicted share and round gold share (None: too few points or no spread)."""
    import numpy as np

    x = np.array([p["round_gold_share"] for p in points])
    y = np.array([p["predicted_share"] for p in points])
    if len(points) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def plot(results: dict, word: str, gold: float | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, case in results.items():
        r = case["pearson_r"]
        ax.scatter([p["round_gold_share"] for p in case["points"]], [p["predicted_share"] for p in case["points"]],
                   s=22, label=f"{label} (r = {r:.2f})" if r is not None else label)
    if gold is not None:
        ax.axhline(gold, color="black", ls=":", lw=1, label=f'dev rows whose gold label is "{word}"')
    ax.set_xlabel(f'share of "{word}" rows among the last round\'s clients')
    ax.set_ylabel(f'share of dev rows answered "{word}"')
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Does the global model follow its last round's label mix?")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="tta_qnli", help="the time-to-accuracy run whose cases to read")
    p.add_argument("--params", default="params.yaml", help="the params.yaml the cases were run with")
    p.add_argument("--methods", nargs="+", metavar="LABEL",
                   help="cases to (re)compute; the other cases of an earlier results file are kept (default: all)")
    args = p.parse_args(argv)

    from benchmarks.common import RESULTS, method_config, parse_overrides, save
    from benchmarks.time_to_accuracy import favourite_label
    from edgetune.config import BadInput, load_params
    from edgetune.tasks import get_task

    source = RESULTS / f"{args.name}.json"
    if not source.is_file():
        p.error(f"{source} not found; run benchmarks.time_to_accuracy --name {args.name} first")
    record = json.loads(source.read_text())
    zero = record["results"]["zero_shot"]
    cases = {k: v for k, v in record["results"].items() if k not in ("zero_shot", "at_equal_minutes")}
    missing = [m for m in args.methods or [] if m not in cases]
    if missing:
        p.error(f"{source} has no case {', '.join(missing)}; it has {', '.join(cases)}")
    key, word = favourite_label(zero)
    if key is None:
        p.error(f"{source}: its zero-shot record has no predicted label shares")
    finetune = load_params(args.params).finetune
    overrides = parse_overrides(record["params"].get("overrides", "").split())
    words = get_task(record["params"]["task"]).label_words
    results = kept_cases(RESULTS / f"{args.name}_label_mix.json", cases, args.methods)
    for label in args.methods or list(cases):
        cfg = method_config(finetune, label, {"num_rounds": record["params"]["rounds"]}, overrides)
        if cfg.spec.centralized:
            print(f"{label}: one client holds every row (centralized), no round mix to follow")
            continue
        try:
            points = case_points(label, cases[label], cfg, word, words)
        except (ValueError, BadInput) as e:  # e.g. a case's partitions folder is gone
            p.error(str(e))
        results[label] = {"points": points, "pearson_r": correlation(points), "sample_rate": cfg.sample_rate}
        print(f"{label}: {len(points)} scorings, r = {results[label]['pearson_r']}")
    png = RESULTS / f"{args.name}_label_mix.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, word, zero.get(f"gold_share_{word}"), png)
    out = save(f"{args.name}_label_mix", {**results, "label": word},
               {"tta_name": args.name, "methods": ",".join(results), "label": word}, artifacts=[png])
    print(out)


if __name__ == "__main__":
    main()
