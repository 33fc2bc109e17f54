"""Bytes per client per round of every method at the default settings (issue 3).

Runs each method for two rounds through the real engine on the real model and batch settings
of params.yaml, and reports the serialized size of the real messages (round 2, when the
broadcast carries the first round's aggregate, and FedPepTAO, past its scoring round, exchanges
the selected layers' prefixes). Seed-scalar messages do not depend on which
weights are trained, so the zeroth-order methods run with LoRA trainable here to keep the
benchmark short; FedIT's message is the LoRA weights themselves.
Target: FedKSeed <= 18 KB per client per round; also reports FedIT / FedKSeed.

    python -m benchmarks.comm [--model DIR] [--params params.yaml]
"""

from __future__ import annotations

import argparse

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--mirror")
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)

    from benchmarks.common import model_dir, save
    from edgetune.config import load_params
    from edgetune.federated import registry
    from edgetune.federated.engine import ClientData, run_federation
    from edgetune.federated.setup import engine_options, prepare
    from edgetune.tasks import get_task, resolve_mirror

    params = load_params(args.params)
    path = str(model_dir(args.model))
    ds = get_task("sst2").load("train", resolve_mirror(args.mirror)).select(range(800))
    prompts, labels = list(ds["prompt"]), list(ds["label"])
    n = params.partition.num_clients
    clients = [ClientData(i, prompts[i::n], labels[i::n]) for i in range(n)]
    results = {}
    for name in registry.names():
        cfg = params.finetune.model_copy(update={
            "method": name, "num_rounds": 2, "trainable": "lora" if registry.lookup(name).zo else "auto"})
        use = clients
        if cfg.spec.centralized:  # mezo: one client holding every row, every round
            use, cfg = [ClientData(0, prompts, labels)], cfg.model_copy(update={"sample_rate": 1.0})
        method, model = prepare(path, get_task("sst2"), cfg, len(use), cfg.sample_rate)
        _, history = run_federation(method, model, use, **engine_options(cfg, use))
        last = history[-1]
        results[name] = {"bytes_up": last.bytes_up_per_client, "bytes_down": last.bytes_down_per_client,
                         "bytes_per_client_round": last.bytes_up_per_client + last.bytes_down_per_client}
        print(f"{name:14s} up {last.bytes_up_per_client:10.0f} B  down {last.bytes_down_per_client:10.0f} B")
    results["fedit_over_fedkseed"] = (results["fedit"]["bytes_per_client_round"]
                                      / results["fedkseed"]["bytes_per_client_round"])
    results["fedkseed_under_18kb"] = float(results["fedkseed"]["bytes_per_client_round"] <= 18_000)
    print(save("comm", results, {"model": path, "local_steps": params.finetune.local_steps,
                                 "K": params.finetune.zo.K, "lora_r": params.finetune.lora.r,
                                 "lora_targets": ",".join(params.finetune.lora.targets)}))


if __name__ == "__main__":
    main()
