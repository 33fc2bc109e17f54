"""How far does each client move the global model in one round, and does it depend on what
the client has left to learn? For each case, every client runs one round of local work from the
same global state (the method's initial one: the base model, LoRA B = 0) with its round-1
generator, and the script records the client's mean local loss, its rows' label mix and the L2
norm of its update (reply minus the global state); per case, the Pearson r of update norm and loss.

A fresh AdamW moves every coordinate by about lr in its first steps whatever the gradient's
size, so a client whose rows the base model already answers (loss near 0) moves the model as
far as one it gets wrong; plain local SGD (finetune.client_optimizer sgd) moves it in proportion
to the gradient (docs/results.md, QNLI). Nothing is scored on the dev split.
Writes results/<name>.{json,png} and an MLflow run in `edgetune-benchmarks`.

    python -m benchmarks.client_drift --params /tmp/qnli/params.yaml --partitions \\
        /tmp/qnli/partitions --task qnli --local-steps 5 --name client_drift_qnli \\
        --methods fedit fedit-sgd --set fedit-sgd:method=fedit \\
        --set fedit-sgd:client_optimizer=sgd --set fedit-sgd:lr=0.3
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def client_moves(cfg, path, task, clients) -> list[dict]:
    """One round of local work per client from the method's initial global state."""
    from benchmarks.common import round_label_mix
    from edgetune.federated.aggregation import update_norm
    from edgetune.federated.engine import client_generator
    from edgetune.federated.protocol import Message
    from edgetune.federated.setup import prepare

    method, model = prepare(path, task, cfg, len(clients), cfg.sample_rate)
    state = method.init_state(model)
    out = []
    for client in clients:
        reply = method.client_update(model, Message(state), client, client_generator(cfg.seed, 1, client.client_id))
        mix = round_label_mix(clients, [client.client_id], task.label_words)
        out.append({"client": client.client_id, "rows": len(client), "loss": reply.meta["loss"],
                    "update_norm": update_norm([reply.tensors[k] - state[k] for k in reply.tensors]),
                    **{k.replace("round_", ""): v for k, v in mix.items()}})
    return out


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, case in results.items():
        clients = case["clients"]
        ax.plot([c["loss"] for c in clients], [c["update_norm"] for c in clients], "o",
                label=f"{label} (r = {case['pearson_r_norm_loss']:.2f})")
    ax.set_xlabel("client's mean local loss in the round")
    ax.set_ylabel("L2 norm of its update (reply - global)")
    ax.set_title("How far one round of local work moves the model, per client")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    from benchmarks.common import RESULTS, case_arguments, method_config, model_dir, parse_overrides, save

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    case_arguments(p, ["fedit"])
    p.add_argument("--name", default="client_drift")
    args = p.parse_args(argv)

    from edgetune.config import load_params
    from edgetune.federated.setup import load_clients
    from edgetune.tasks import get_task

    params, path, task = load_params(args.params), model_dir(args.model), get_task(args.task)
    clients, overrides = load_clients(args.partitions), parse_overrides(args.set)
    budget = {"local_steps": args.local_steps} if args.local_steps else {}
    configs = {label: method_config(params.finetune, label, budget, overrides) for label in args.methods}
    results = {}
    for label, cfg in configs.items():  # every config validated above, before any training
        moves = client_moves(cfg, path, task, clients)
        results[label] = {"clients": moves, "pearson_r_norm_loss": statistics.correlation(
            [c["loss"] for c in moves], [c["update_norm"] for c in moves])}
        print(f"{label}: " + ", ".join(f"client {c['client']} loss {c['loss']:.3f} moves {c['update_norm']:.2f}"
                                       for c in moves))
    png = RESULTS / f"{args.name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, png)
    save(args.name, results, {"partitions": args.partitions, "task": args.task, "cases": " ".join(args.methods),
                              "overrides": " ".join(args.set), "local_steps": args.local_steps or "params"},
         artifacts=[png])


if __name__ == "__main__":
    main()
