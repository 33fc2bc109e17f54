"""Memorization audit across methods, with and without client-level DP: canary exposure and a
membership-inference AUC next to utility (edgetune/audit.py; Carlini et al. 2019, Yeom et al. 2018).

One audited partition for every case (canaries planted on audit.clients, non-members held out),
then per case: the federation through the real engine on the real model, the global model's
exposure per repetition count, its loss-attack AUC and its held-out loss (utility: the task
objective on rows no client had). The base model is measured first (the no-training reference).

    python -m benchmarks.memorization --task dolly --methods fedit fedfull fedkseed fedkseed-lora \
        --set fedkseed-lora:method=fedkseed --set fedkseed-lora:trainable=lora --dp 0 1.0

The question it answers: does a forward-only, seed-scalar update memorize less than backprop
at the same budget, and what does DP cost each? Rows with `dp_epsilon` ran with finetune.dp on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def audited_partitions(task, args, audit, out: Path) -> Path:
    """args.max_train seeded train rows, non-members held out, iid over args.clients clients,
    canaries planted; written as the partition stage writes them (client_*.parquet, audit/)."""
    import shutil

    from edgetune.audit import audited_partition
    from edgetune.config import PartitionParams
    from edgetune.tasks import resolve_mirror

    train = task.load("train", resolve_mirror(args.mirror)).shuffle(seed=0).select(range(args.max_train))
    shutil.rmtree(out, ignore_errors=True)
    split = PartitionParams(scheme="iid", num_clients=args.clients, min_size=1)
    clients = audited_partition(train, split, audit, task.target_column, out)
    for i, c in enumerate(clients):
        c.to_parquet(out / f"client_{i:04d}.parquet")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF folder (default: models/base or the packaged SmolLM2)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--mirror", help="data mirror (default: $EDGETUNE_DATA_MIRROR)")
    p.add_argument("--task", default="dolly")
    p.add_argument("--methods", nargs="+", default=["fedit", "fedfull", "fedkseed"], metavar="LABEL")
    p.add_argument("--set", action="append", default=[], metavar="LABEL:KEY=VALUE",
                   help="per-case finetune override, e.g. fedkseed-lora:trainable=lora (repeatable)")
    p.add_argument("--dp", nargs="+", type=float, default=[0.0, 1.0],
                   help="finetune.dp.noise_multiplier values; every method runs with each (0 = off)")
    p.add_argument("--max-train", type=int, default=400)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--canaries", type=int, default=6)
    p.add_argument("--repetitions", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--members", type=int, default=32)
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--name", default="memorization_dolly")
    args = p.parse_args(argv)

    from benchmarks.common import CACHE, method_config, model_dir, parse_overrides, save
    from edgetune.audit import measure
    from edgetune.config import AuditParams, load_params
    from edgetune.federated.engine import run_federation
    from edgetune.federated.setup import engine_options, load_clients, prepare
    from edgetune.models import load_hf
    from edgetune.tasks import get_task

    params = load_params(args.params)
    task = get_task(args.task)
    audit = AuditParams(canaries=args.canaries, repetitions=args.repetitions, clients=[0],
                        members=args.members, candidates=args.candidates)
    folder = audited_partitions(task, args, audit, CACHE / "memorization" / args.task)
    clients = load_clients(folder, task.target_column)
    path = str(model_dir(args.model))
    overrides = parse_overrides(args.set)
    budget = {"num_rounds": args.rounds, "local_steps": args.local_steps, "sample_rate": 1.0}
    max_length = params.finetune.max_length

    model, tok = load_hf(path)
    results = {"base": measure(model, tok, task, folder / "audit", audit, max_length)}
    print("base", summary(results["base"]))
    for name in args.methods:
        for noise in args.dp:
            cfg = method_config(params.finetune, name, budget, overrides)
            cfg = cfg.model_copy(update={"dp": cfg.dp.model_copy(update={"noise_multiplier": noise})})
            method, model = prepare(path, task, cfg, len(clients), cfg.sample_rate)
            t0 = time.perf_counter()
            state, _ = run_federation(method, model, clients, **engine_options(cfg, clients))
            minutes = (time.perf_counter() - t0) / 60
            method.apply_global(model, state)
            label = f"{name}+dp{noise:g}" if noise else name
            results[label] = {**measure(model, tok, task, folder / "audit", audit, max_length),
                              "method": cfg.method, "trainable": cfg.trainable_set, "minutes": minutes,
                              "dp_noise_multiplier": noise, **method.round_metrics(state)}
            print(label, summary(results[label]))
            (CACHE / "memorization" / f"{args.name}.tmp").write_text(json.dumps(results, indent=2))
    run_params = {"task": args.task, "model": path, "max_train": args.max_train, "clients": args.clients,
                  "rounds": args.rounds, "local_steps": args.local_steps, "canaries": args.canaries,
                  "repetitions": ",".join(map(str, args.repetitions)), "members": args.members,
                  "candidates": args.candidates, "dp_clip": params.finetune.dp.clip,
                  "overrides": " ".join(args.set), "batch_size": params.finetune.batch_size}
    print(save(args.name, results, run_params))
    print(table(results, args.repetitions))


def summary(result: dict) -> dict:
    return {k: round(v, 3) for k, v in result.items() if isinstance(v, float)}


def table(results: dict, repetitions: list[int]) -> str:
    """The markdown table of docs/results.md: one row per case."""
    head = ["case", "DP ε", "held-out loss", "member loss", "MIA AUC",
            *[f"exposure ×{r} (bits)" for r in repetitions]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        eps = r.get("dp_epsilon")
        cells = [label, f"{eps:.0f}" if eps else "–", f"{r['nonmember_loss']:.3f}", f"{r['member_loss']:.3f}",
                 f"{r['mia_auc']:.2f}", *[f"{r[f'exposure_rep{k}']:.1f}" for k in repetitions]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
