"""What secure aggregation (finetune.secagg, edgetune/federated/secagg.py) costs, and that FedIT
learns the same with it.

1. The protocol, per round, on the real model's trainable sets (FedIT's LoRA blocks; every
   weight for fedfull) at m clients per round: one client's masking (fixed point, m - 1 key
   agreements and mask streams), the server's unmasking with every client replying and with
   one silent client (its masks recovered from the others' pair seeds), against that method's
   own local work on one client (local_steps AdamW steps on real batches), in the same process.
2. The default pipeline's FedIT federation (params.yaml, SST-2 partitions) run twice on the local
   backend, plain and with secagg, with client dropouts (--dropout) and min_clients 2: seconds
   and bytes per round, the largest weight difference, and both models' dev accuracy.
3. FedKSeed's bytes per client per round, plain and with secagg (two rounds each).

Writes results/secagg.json and an MLflow run in `edgetune-benchmarks`.

    python -m benchmarks.secagg [--model DIR] [--clients 2 4 8 16] [--dropout 0.2]
"""

from __future__ import annotations

import argparse
import time


def synthetic_round(method, m: int, seed: int = 0):
    """A broadcast of the method's blocks with m clients announced, and each client's key and
    reply (the blocks plus small Gaussian updates)."""
    import torch

    from edgetune.federated import secagg
    from edgetune.federated.protocol import Message

    gen = torch.Generator().manual_seed(seed)
    keys = {c: secagg.new_key() for c in range(m)}
    sent = Message({k: v.detach().float().clone() for k, v in method.blocks.items()})
    secagg.announce(sent, list(range(m)), {c: (secagg.public_bytes(keys[c]), 100) for c in keys}, 1, 0)
    replies = {c: Message({k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in sent.tensors.items()
                           if not k.startswith("secagg.")}, {"num_samples": 100, "loss": 0.6}) for c in keys}
    return sent, keys, replies


def protocol_costs(method, m: int) -> dict[str, float]:
    """Seconds: one client's mask, the server's unmask into one reply (all replied / one
    silent), one client's reveal."""
    from edgetune.federated import secagg

    sent, keys, replies = synthetic_round(method, m)
    t0 = time.perf_counter()
    masked = {c: secagg.masked_reply(method, replies[c], sent, keys[c], c, 64.0) for c in keys}
    mask_s = (time.perf_counter() - t0) / m

    def unmask(revealed) -> float:
        t0 = time.perf_counter()
        mean, loss, samples = secagg.unmask(sent, masked, revealed)
        method.from_mean(mean, sent, {"num_samples": samples, "loss": loss})
        return time.perf_counter() - t0

    unmask_s = unmask({})
    silent = m - 1
    del masked[silent]
    t0 = time.perf_counter()
    revealed = {(i, silent): secagg.reveal(keys[i], {silent: secagg.roster_of(sent)[silent][0]}, 1, 0)[silent]
                for i in masked}
    reveal_s = (time.perf_counter() - t0) / len(masked)
    return {"mask_s": mask_s, "unmask_s": unmask_s, "unmask_one_silent_s": unmask(revealed),
            "reveal_s": reveal_s, "coordinates": method.summand_size(sent) + 1}


def client_seconds(method, model, client, seed: int) -> float:
    """One client's local work (the method's client_update) on its initial state, timed on the
    second call (the first pays the process's one-off costs)."""
    from edgetune.federated.engine import client_generator
    from edgetune.federated.protocol import Message

    for _ in range(2):
        t0 = time.perf_counter()
        method.client_update(model, Message(method.init_state(model)), client, client_generator(seed, 1, 0))
    return time.perf_counter() - t0


def federation(scorer, cfg, label: str) -> dict:
    """Run cfg's federation on the partition stage's clients; per-round costs and the score."""
    from edgetune.federated.engine import run_federation
    from edgetune.federated.setup import engine_options, prepare

    method, model = prepare(scorer.path, scorer.task, cfg, len(scorer.clients), cfg.sample_rate)
    state, history = run_federation(method, model, scorer.clients, **engine_options(cfg, scorer.clients))
    method.apply_global(model, state)
    return {"state": state, "row": {
        "seconds_per_round": sum(h.seconds for h in history) / len(history),
        "bytes_up_per_client": history[-1].bytes_up_per_client,
        "bytes_down_per_client": history[-1].bytes_down_per_client,
        "bytes_total": sum(h.bytes_exchanged for h in history),
        "bytes_secagg_recovery": sum(h.extra.get("bytes_secagg_recovery", 0.0) for h in history),
        "clients_dropped": sum(len(h.dropped) for h in history),
        "final_train_loss": history[-1].train_loss,
        **{f"dev_{k}": v for k, v in scorer.metrics(model, label).items()}}}


def seed_scalar_bytes(scorer, cfg) -> dict:
    """3. FedKSeed's bytes per client per round with and without secure aggregation (two rounds
    on LoRA: the messages do not depend on the trainable set): a client's K-vector replaces its
    (seed index, scalar) pairs."""
    from edgetune.federated.engine import run_federation
    from edgetune.federated.setup import engine_options, prepare

    plain = cfg.model_copy(update={"method": "fedkseed", "trainable": "lora", "num_rounds": 2, "min_clients": 2})
    out = {}
    for label, use in (("fedkseed", plain), ("fedkseed_secagg", plain.model_copy(
            update={"secagg": plain.secagg.model_copy(update={"enabled": True})}))):
        method, model = prepare(scorer.path, scorer.task, use, len(scorer.clients), use.sample_rate)
        _, history = run_federation(method, model, scorer.clients, **engine_options(use, scorer.clients))
        out[label] = {"bytes_up_per_client": history[-1].bytes_up_per_client,
                      "bytes_down_per_client": history[-1].bytes_down_per_client, "K": use.zo.K}
        print(f"{label:16s} up {history[-1].bytes_up_per_client:,.0f} B  down {history[-1].bytes_down_per_client:,.0f} B")
    return out


def main(argv=None) -> None:
    from benchmarks.common import scorer_arguments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scorer_arguments(p)
    p.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8, 16], help="clients per round (part 1)")
    p.add_argument("--full-clients", type=int, nargs="+", default=[2, 4],
                   help="clients per round for every weight (fedfull; 0.5 GB per mask stream)")
    p.add_argument("--dropout", type=float, default=0.2, help="part 2: finetune.dropout of both runs")
    args = p.parse_args(argv)

    import torch

    from benchmarks.common import DevScorer, save
    from edgetune.federated.setup import prepare

    scorer = DevScorer(args)
    cfg = scorer.params.finetune
    results: dict = {"protocol": {}, "client_update_s": {}}
    for name, method_name, counts in (("lora", "fedit", args.clients), ("full", "fedfull", args.full_clients)):
        use = cfg.model_copy(update={"method": method_name})
        method, model = prepare(scorer.path, scorer.task, use, len(scorer.clients), use.sample_rate)
        local = results["client_update_s"][method_name] = client_seconds(method, model, scorer.clients[0], cfg.seed)
        for m in counts:
            row = protocol_costs(method, m)
            row["mask_over_client_update"] = row["mask_s"] / local
            results["protocol"][f"{name}_m{m}"] = row
            print(f"{name:5s} m={m:3d}  mask {row['mask_s']:.3f} s ({row['mask_over_client_update']:.1%} of a "
                  f"{method_name} client's {local:.1f} s)  unmask {row['unmask_s']:.3f} s  one silent "
                  f"{row['unmask_one_silent_s']:.3f} s  reveal {row['reveal_s'] * 1e3:.2f} ms")
        del method, model

    base = cfg.model_copy(update={"dropout": args.dropout, "min_clients": 2})
    secure = base.model_copy(update={"secagg": base.secagg.model_copy(update={"enabled": True})})
    plain, masked = federation(scorer, base, "fedit"), federation(scorer, secure, "fedit + secagg")
    results["plain"], results["secagg"] = plain["row"], masked["row"]
    results["max_weight_difference"] = max(float((plain["state"][k] - masked["state"][k]).abs().max())
                                           for k in plain["state"])
    results["zero_shot_accuracy"] = scorer.zero_shot
    results.update(seed_scalar_bytes(scorer, cfg))
    for label in ("plain", "secagg"):
        row = results[label]
        print(f"{label:7s} {row['seconds_per_round']:.1f} s/round  up {row['bytes_up_per_client']:,.0f} B  "
              f"down {row['bytes_down_per_client']:,.0f} B  dropped {row['clients_dropped']}  "
              f"dev accuracy {row['dev_accuracy']:.4f}")
    print(f"largest weight difference {results['max_weight_difference']:.2e}")
    params = {"model": scorer.path, "rounds": cfg.num_rounds, "local_steps": cfg.local_steps,
              "batch_size": cfg.batch_size, "dropout": args.dropout, "eval_examples": len(scorer.gold),
              "torch_threads": torch.get_num_threads(), "num_clients": len(scorer.clients)}
    print(save("secagg", results, params))


if __name__ == "__main__":
    main()
