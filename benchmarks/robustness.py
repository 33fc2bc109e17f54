"""Accuracy under Byzantine clients and under differential privacy (issue 7).

Attacks (`--part attacks`, results/robust_<method>.json): SST-2 split over 10 clients, every
client in every round (so exactly 20% of each round's replies, 2 of 10, are malicious), each
attack kind (scaled x10, sign flip x10, random, replayed seeds) folded by the plain mean and by
each robust rule (median, trimmed mean beta 0.2, Multi-Krum f 2, clipped mean), next to the
clean run, scored on the whole dev split (872).

DP (`--part dp`, results/dp_<method>.json): client-level DP at two noise levels, 5 of the 10
clients per round (sampling amplifies privacy), with the epsilon they spend. `--part dp-secagg`
(results/dp_secagg_<method>.json): the first level again, under secure aggregation with the
server's noise and with the clients' shares.

Every case is a run of the real engine on the real model through benchmarks/methods.py (same
clients, same budget, the global model scored on the dev split).

    python -m benchmarks.robustness --method fedit              # attacks -> results/robust_fedit.json
    python -m benchmarks.robustness --method fedkseed
    python -m benchmarks.robustness --method fedit --part dp    # -> results/dp_fedit.json
    python -m benchmarks.robustness --method fedkseed --part keyed  # -> results/keyed_fedkseed.json
    python -m benchmarks.robustness --method fedkseed --part dp-secagg  # -> results/dp_secagg_fedkseed.json
    python -m benchmarks.robustness --table                     # -> results/robustness.md

The 10-client partition is made once by the partition stage into benchmarks/.cache/robust/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks.common import CACHE, RESULTS

ATTACKS = ["scaled", "sign_flip", "random", "replayed_seeds"]
RULES = {"mean": {}, "median": {}, "trimmed_mean": {"beta": 0.2}, "krum": {"krum_f": 2},
         "clipped_mean": {}}
FRACTION = 0.2
# per method: its own overrides, the clipped_mean tau and DP clip near its typical update norm
# (measured: FedIT LoRA updates 1.4-1.7 after 3 steps, FedKSeed-LoRA scalar vectors 1.1-2.8)
METHODS = {
    "fedit": {"base": {}, "attacks": {}, "clip": 1.0},
    # the attack grid draws from K = 8 seeds, so that seeds are shared and the per-seed rules
    # have several votes (30 draws a round); K = 4096 runs alongside as the reference
    "fedkseed": {"base": {"trainable": "lora", "zo.lr": 1e-2, "zo.eps": 1e-2},
                 "attacks": {"zo.K": 8}, "clip": 2.0},
}
ATTACK_SAMPLE_RATE = 1.0  # all 10 clients every round: 2 malicious replies in each
DP_NOISE = [0.5, 1.5]
DP_SAMPLE_RATE = 0.5
DP_K = 64  # FedKSeed with DP: noise lands on all K candidates, so a small pool (see privacy.py)


def partition(folder: Path, prepared: str) -> Path:
    """10 clients, Dirichlet alpha 0.5 over labels, from the pipeline's prepared SST-2."""
    out = folder / "partitions"
    if (out / "stats.json").is_file():
        return out
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["partition"].update({"num_clients": 10, "scheme": "dirichlet", "alpha": 0.5})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "stages.partition", "--params", str(folder / "params.yaml"),
                    "--data", prepared, "--out", str(out), "--plot", str(folder / "label_share.png"),
                    "--metrics", str(folder / "partition.json")], check=True)
    return out


def attack_cases(method: str, zo_k: int | None = None) -> dict[str, dict]:
    """label -> finetune overrides: clean, then attack x rule (`zo_k`: another seed pool)."""
    spec = METHODS[method]
    base = {"method": method, **spec["base"], **spec["attacks"], "sample_rate": ATTACK_SAMPLE_RATE,
            **({"zo.K": zo_k} if zo_k else {})}
    out = {"clean": base}
    if method == "fedkseed":  # the method's usual seed pool, as a reference for the small one
        out["clean/K4096"] = {**base, "zo.K": 4096}
    for attack in ATTACKS:
        for rule, knobs in RULES.items():
            agg = {"aggregation.rule": rule, **{f"aggregation.{k}": v for k, v in knobs.items()}}
            if rule == "clipped_mean":
                agg["aggregation.tau"] = spec["clip"]
            out[f"{attack}/{rule}"] = {**base, **agg, "attack.kind": attack,
                                       "attack.fraction": FRACTION, "attack.scale": 10.0}
    return out


def keyed_cases(method: str, zo_k: int | None = None) -> dict[str, dict]:
    """label -> finetune overrides: FedKSeed with a federation key (sealed messages, keys.py),
    clean and under the replayed_seeds attack with the plain mean: the replayed replies carry
    an old round's MAC, so the server rejects them instead of averaging them in."""
    base = {**attack_cases(method, zo_k)["clean"], "zo.secret": f"file:{benchmark_key()}"}
    return {"clean/keyed": base,
            "replayed_seeds/mean+mac": {**base, "attack.kind": "replayed_seeds", "attack.fraction": FRACTION,
                                        "attack.scale": 10.0}}


def benchmark_key() -> Path:
    """A fixed 256-bit key, so the keyed cases are reproducible: a benchmark key, not a secret."""
    import hashlib

    path = CACHE / "robust" / "benchmark.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hashlib.sha256(b"edgetune robustness benchmark key").hexdigest())
    return path


def dp_cases(method: str) -> dict[str, dict]:
    """label -> finetune overrides: clean, then DP at each noise level."""
    spec = METHODS[method]
    base = {"method": method, **spec["base"], "sample_rate": DP_SAMPLE_RATE}
    if method == "fedkseed":
        base["zo.K"] = DP_K
    out = {"clean": base}
    for z in DP_NOISE:
        out[f"dp/z{z}"] = {**base, "dp.noise_multiplier": z, "dp.clip": spec["clip"]}
    return out


def dp_secagg_cases(method: str) -> dict[str, dict]:
    """label -> finetune overrides: DP at the first noise level, central (the reference) and under
    secure aggregation with the server's noise, then with the clients' shares planned for 5
    replies (= the clients per round: the central noise exactly) and for 2 (more noise, dropouts
    allowed)."""
    z = DP_NOISE[0]
    central = dp_cases(method)[f"dp/z{z}"]
    secure = {**central, "secagg.enabled": True, "min_clients": 2}
    return {f"dp/z{z}": central, f"dp/z{z}/secagg-server": secure,  # MLflow names: no "+"
            f"dp/z{z}/secagg-clients-t5": {**secure, "dp.noise": "clients", "min_clients": 5},
            f"dp/z{z}/secagg-clients-t2": {**secure, "dp.noise": "clients"}}


# --part -> results/<prefix>_<method>.json
RESULTS_PREFIX = {"attacks": "robust", "dp": "dp", "keyed": "keyed", "dp-secagg": "dp_secagg"}


def results_name(method: str, part: str) -> str:
    return f"{RESULTS_PREFIX[part]}_{method}"


def run(method: str, args) -> None:
    from benchmarks import methods

    parts = partition(CACHE / "robust", args.prepared)
    if args.part in ("dp", "dp-secagg"):
        labels = (dp_cases if args.part == "dp" else dp_secagg_cases)(method)
    else:
        labels = (keyed_cases if args.part == "keyed" else attack_cases)(method, args.zo_k)
    name = args.name or results_name(method, args.part)
    argv = ["--partitions", str(parts), "--eval", f"{args.prepared}/eval.parquet",
            "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--name", name,
            "--methods", *(args.only or labels)]
    if args.max_eval:
        argv += ["--max-eval", str(args.max_eval)]
    if args.update:
        argv.append("--update")
    if args.part == "keyed":
        argv.append("--replay-without-key")
    for label, overrides in labels.items():
        argv += [a for key, value in overrides.items() for a in ("--set", f"{label}:{key}={value}")]
    methods.main(argv)


def merge(into: str, parts: list[str]) -> None:
    """Fold the cases of results files `parts` into `into` (each case keeps its own numbers;
    the params record which file each came from)."""
    record = json.loads((RESULTS / f"{into}.json").read_text())
    for part in parts:
        other = json.loads((RESULTS / f"{part}.json").read_text())
        cases = {k: v for k, v in other["results"].items() if k != "zero_shot"}
        record["results"].update(cases)
        record["params"][f"merged_from_{part}"] = ",".join(sorted(cases))
    record["params"]["methods"] = ",".join(k for k in record["results"] if k != "zero_shot")
    (RESULTS / f"{into}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def load(name: str) -> tuple[dict, dict] | None:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record["results"], record["params"]


def attack_table(method: str, res: dict, params: dict) -> list[str]:
    acc = lambda label: res[label]["accuracy"] if label in res else float("nan")
    clean = acc("clean")
    extra = f", K 4096 clean {acc('clean/K4096'):.3f}" if "clean/K4096" in res else ""
    lines = [f"### {method}: attacks (zero-shot {acc('zero_shot'):.3f}, clean {clean:.3f}{extra}; "
             f"{params.get('eval_examples')} dev examples)", "",
             "| attack (20% of clients) | " + " | ".join(RULES) + " |", "|---" * (len(RULES) + 1) + "|"]
    for attack in ATTACKS:
        cells = [f"{acc(f'{attack}/{r}'):.3f} ({100 * (acc(f'{attack}/{r}') - clean):+.1f})" for r in RULES]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    worst = {r: min(acc(f"{a}/{r}") for a in ATTACKS) - clean for r in RULES}
    lines.append("| worst vs clean | " + " | ".join(f"{100 * worst[r]:+.1f} pt" for r in RULES) + " |")
    return lines + [""]


def dp_table(method: str, res: dict, params: dict) -> list[str]:
    clean = res["clean"]["accuracy"]
    lines = [f"### {method}: client-level DP (clean {clean:.3f}; {params.get('eval_examples')} dev examples)", "",
             "| DP noise multiplier | clip | epsilon (delta 1e-5) | accuracy | vs clean |", "|---|---|---|---|---|"]
    for z in DP_NOISE:
        label = f"dp/z{z}"
        if label in res:
            lines.append(f"| {z} | {METHODS[method]['clip']} | {res[label].get('dp_epsilon', float('nan')):.2f} | "
                         f"{res[label]['accuracy']:.3f} | {100 * (res[label]['accuracy'] - clean):+.1f} pt |")
    return lines + [""]


def dp_secagg_table(method: str, res: dict, params: dict) -> list[str]:
    lines = [f"### {method}: DP under secure aggregation ({params.get('eval_examples')} dev examples)", "",
             "| case | epsilon (delta 1e-5) | accuracy | bytes / client / round | minutes |", "|---|---|---|---|---|"]
    zero_shot = res["zero_shot"]["accuracy"]
    lines[0] = lines[0][:-1] + f", zero-shot {zero_shot:.3f})"
    for label in params["methods"].split(","):  # the order they ran in
        row = res[label]
        lines.append(f"| {label} | {row.get('dp_epsilon', float('nan')):.2f} | {row['accuracy']:.3f} | "
                     f"{row['bytes_per_client_round']:,.0f} | {row['minutes']:.1f} |")
    return lines + [""]


def table() -> str:
    """Markdown: per method, accuracy by attack (rows) and rule (columns) vs clean, then DP."""
    lines = []
    for method in METHODS:
        if (found := load(f"robust_{method}")) is not None:
            lines += attack_table(method, *found)
        if (found := load(f"dp_{method}")) is not None:
            lines += dp_table(method, *found)
        if (found := load(f"dp_secagg_{method}")) is not None:
            lines += dp_secagg_table(method, *found)
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=sorted(METHODS))
    p.add_argument("--part", choices=list(RESULTS_PREFIX), default="attacks",
                   help="keyed (fedkseed): a federation key's sealed messages against replayed_seeds; "
                   "dp-secagg: DP under secure aggregation, the server's or the clients' noise")
    p.add_argument("--only", nargs="+", metavar="LABEL", help="run only these cases (e.g. clean sign_flip/krum)")
    p.add_argument("--name", help="results file name (default robust_ / dp_ / keyed_<method>); e.g. to run "
                   "some cases in a second process, then --merge its file")
    p.add_argument("--merge", nargs="+", metavar="NAME", help="fold these results files' cases into --method's "
                   "file (the cases of a run split over processes)")
    p.add_argument("--prepared", default="data/prepared", help="the prepare stage's SST-2 folder")
    p.add_argument("--zo-k", type=int, help="FedKSeed's seed pool for the attack cases (default 8); more votes "
                   "per seed with a smaller one. Use with --name, e.g. robust_fedkseed_k4")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--max-eval", type=int, help="first N dev examples (default: all 872)")
    p.add_argument("--update", action="store_true", help="keep finished cases of an earlier run")
    p.add_argument("--table", action="store_true", help="write results/robustness.md from the JSONs")
    args = p.parse_args(argv)
    if args.method and args.merge:
        merge(args.name or results_name(args.method, args.part), args.merge)
    elif args.method:
        run(args.method, args)
    if args.table:
        (RESULTS / "robustness.md").write_text(table())
        print(table())


if __name__ == "__main__":
    main()
