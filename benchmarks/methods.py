"""Federated methods side by side on one task: same partition, same round/step budget.

For each method: run the federation through the real engine on the real model, then score
dev accuracy of the resulting global model (label-word logits), next to zero-shot.
Reports per method: accuracy, macro-F1 and the predicted label shares, first/last round train
loss, bytes up+down per client per round,
minutes. Uses the partition stage's output (data/partitions) so every method sees the same
clients. Peak-memory ratios come from benchmarks/memory.py (one fresh process per case).

    python -m benchmarks.methods --methods fedit fedkseed --rounds 12 --local-steps 4 \
        --set fedkseed:trainable=lora --set fedkseed:zo.lr=1e-3 --name methods_sst2

Another task: prepare and partition it with the stage scripts into another folder and pass
--task, --partitions and --eval (see benchmarks/README.md). --update merges into an existing
results file instead of replacing it (re-running one method). Each finished case is kept in
<name>.tmp until the results file is written: the same command run again after a crash takes the
cases it finished from there (only those whose config, model, partitions and dev set are unchanged).
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> None:
    from benchmarks.common import case_arguments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    case_arguments(p, ["fedit", "mezo", "job", "fedkseed", "fedkseed-pro", "fwdllm"])
    p.add_argument("--rounds", type=int)
    p.add_argument("--max-length", type=int, help="prompt tokens kept (default: finetune.max_length)")
    p.add_argument("--name", default="methods_sst2")
    p.add_argument("--update", action="store_true", help="merge into an existing results file")
    p.add_argument("--replay-without-key", action="store_true",
                   help="cases with finetune.zo.secret: also replay the final dictionary onto the base "
                   "model without the key (an eavesdropper) and score that model")
    args = p.parse_args(argv)

    from benchmarks.common import RESULTS, DevScorer, method_config, parse_overrides, save
    from edgetune.federated.engine import run_federation
    from edgetune.federated.setup import centralize, engine_options, prepare

    score = DevScorer(args)  # params, clients, dev rows, and the zero-shot scores
    params, path, clients = score.params, score.path, score.clients
    overrides = parse_overrides(args.set)
    budget = {k: v for k, v in {"num_rounds": args.rounds, "local_steps": args.local_steps,
                                "max_length": args.max_length}.items() if v}
    results, run_params = {}, {}
    if args.update and (RESULTS / f"{args.name}.json").is_file():
        previous = json.loads((RESULTS / f"{args.name}.json").read_text())
        results, run_params = previous["results"], previous["params"]
    results["zero_shot"] = score.zero_shot_metrics
    print(f"zero-shot accuracy {score.zero_shot:.4f}")
    partial = RESULTS / f"{args.name}.tmp"
    finished, keys = finished_cases(partial), {}
    for name in args.methods:
        cfg = method_config(params.finetune, name, budget, overrides)
        use, rate = clients, cfg.sample_rate
        if cfg.spec.centralized:  # mezo: the federation's step budget on pooled data
            use, rate, cfg = centralize(clients, cfg)
        keys[name] = case_key(cfg, args, score)
        if name in finished and finished[name][0] == keys[name]:
            results[name] = finished[name][1]
            print(f"{name}: finished by an earlier run of this command, taken from {partial}")
            continue
        method, model = prepare(path, score.task, cfg, len(use), rate)
        t0 = time.perf_counter()
        state, history = run_federation(method, model, use, **engine_options(cfg, use))
        minutes = (time.perf_counter() - t0) / 60
        method.apply_global(model, state)
        results[name] = {
            **score.metrics(model, name), "trainable": cfg.trainable_set, "minutes": minutes,
            "first_round_loss": history[0].train_loss, "last_round_loss": history[-1].train_loss,
            "mean_loss_first_quarter": sum(h.train_loss for h in history[:max(1, len(history) // 4)]) / max(1, len(history) // 4),
            "mean_loss_last_quarter": sum(h.train_loss for h in history[-max(1, len(history) // 4):]) / max(1, len(history) // 4),
            "bytes_per_client_round": history[-1].bytes_up_per_client + history[-1].bytes_down_per_client,
            "replies_aggregated": sum(len(h.clients) for h in history),
            "replies_rejected": sum(len(h.rejected) for h in history),  # malformed / bad MAC
            "method": cfg.method, "lr": cfg.zo_lr if cfg.spec.zo else cfg.client_lr,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "overrides": " ".join(s for s in args.set if s.startswith(f"{name}:")),
            **method.round_metrics(state),  # e.g. dp_epsilon spent over the run
        }
        if args.replay_without_key and cfg.spec.zo and cfg.zo.secret:
            thief = eavesdropper_model(path, score.task, cfg, state, len(use), rate)
            results[name]["accuracy_replayed_without_key"] = score(thief, f"{name} replayed without the key")
            del thief
        print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results[name].items()})
        # a long grid should not lose finished cases to a crash: keep them in <name>.tmp
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"keys": keys, "results": results}, indent=2, sort_keys=True))
    run_params.update({"model": path, "task": args.task, "eval_examples": len(score.prompts),
                       **{f"budget.{k}": v for k, v in budget.items()}})
    run_params["methods"] = ",".join(k for k in results if k != "zero_shot")
    print(save(args.name, results, run_params))
    partial.unlink(missing_ok=True)


def case_key(cfg, args, score) -> str:
    """What a case's numbers depend on: its finetune config, the model, the partition files
    (path, size, mtime) and the dev set (its size and zero-shot accuracy)."""
    from pathlib import Path

    from edgetune.federated.resume import fingerprint

    return fingerprint({"cfg": cfg.model_dump(mode="json"), "model": score.path, "eval": len(score.prompts),
                        "zero_shot": score.zero_shot, "replay_without_key": args.replay_without_key},
                       [Path(args.partitions)])[:16]


def finished_cases(partial) -> dict[str, tuple[str, dict]]:
    """The cases an interrupted run finished: {label: (case key, results)}."""
    if not partial.is_file():
        return {}
    saved = json.loads(partial.read_text())
    keys = saved.get("keys", {})  # a .tmp from before the keys were written: nothing to reuse
    return {name: (key, saved["results"][name]) for name, key in keys.items() if name in saved["results"]}


def eavesdropper_model(path: str, task, cfg, state, num_clients: int, rate: float):
    """The model of someone who intercepted every broadcast (the whole seed-scalar dictionary)
    and holds the public base model, but not the federation key: the dictionary replayed onto
    the base weights with unkeyed seeds."""
    from edgetune.federated.setup import prepare

    thief_cfg = cfg.model_copy(update={"zo": cfg.zo.model_copy(update={"secret": None})})
    method, model = prepare(path, task, thief_cfg, num_clients, rate)
    method.rebuild(model, state)
    return model


if __name__ == "__main__":
    main()
