"""Glue for the finetune stage: load clients and base model, pick the method, run the engine,
export the model, and summarize."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgetune.config import BadInput, FinetuneParams
from edgetune.federated.engine import ClientData, RoundLog, run_federation


def load_clients(folder: Path, target_column: str = "label") -> list[ClientData]:
    """One ClientData per partition file: prompts and the task's target column."""
    files = sorted(Path(folder).glob("client_*.parquet"))
    if not files:
        raise BadInput(f"{folder}: no client_*.parquet files (run the partition stage first)")
    return [load_client(f, i, target_column) for i, f in enumerate(files)]


def load_client(file: Path, client_id: int, target_column: str = "label") -> ClientData:
    """One client's partition file: its prompts and the task's target column."""
    import pandas as pd

    from edgetune.tasks.base import require_parquet

    frame = pd.read_parquet(require_parquet(file))  # readable, a prompt column, some rows
    if target_column not in frame.columns:
        raise BadInput(f"{file}: no {target_column!r} column (partitions of another task? re-run prepare)")
    targets = frame[target_column]
    return ClientData(client_id, frame["prompt"].tolist(),
                      (targets.astype(int) if target_column == "label" else targets).tolist())


def centralize(clients: list[ClientData], cfg: FinetuneParams):
    """A centralized baseline (mezo) on the federation's budget: one client holding every row,
    run every round for as many local steps as the sampled clients would run together
    (local_steps x clients per round), so it sees as many batches as the federated methods.
    Returns (clients, sample_rate, cfg)."""
    from edgetune.federated.engine import clients_per_round

    steps = cfg.local_steps * clients_per_round(len(clients), cfg.sample_rate)
    pooled = ClientData(0, [p for c in clients for p in c.prompts], [y for c in clients for y in c.targets])
    return [pooled], 1.0, cfg.model_copy(update={"local_steps": steps})


def prepare(base_dir: Path, task, cfg: FinetuneParams, num_clients: int, sample_rate: float):
    """(method, model) ready for the engine: the base model wrapped for the method (adapters
    seeded by finetune.seed), with finetune.dp's Gaussian mechanism attached when on."""
    import torch

    from edgetune.config import clients_per_round
    from edgetune.federated.methods import build_method
    from edgetune.federated.privacy import GaussianMechanism
    from edgetune.models import load_hf

    torch.manual_seed(cfg.seed)  # adapter init
    model, tok = load_hf(base_dir, dtype=torch.float32)
    method = build_method(cfg, tok, task, model)
    model = method.prepare_model(model)
    if cfg.dp.enabled:
        method.privacy = GaussianMechanism(cfg.dp, cfg.seed, clients_per_round(num_clients, sample_rate),
                                           num_clients)
    return method, model


def attack_of(cfg: FinetuneParams, clients: list[ClientData]):
    """The simulated attackers of finetune.attack (attacks.Attack), or None."""
    from edgetune.federated.attacks import Attack

    return Attack(cfg.attack, len(clients), cfg.seed) if cfg.attack.kind != "none" else None


def finetune(base_dir: Path, partitions: Path, task_name: str, cfg: FinetuneParams, out_dir: Path,
             on_round: Callable[[RoundLog], None] | None = None,
             resume=None) -> tuple[dict, list[RoundLog]]:
    """`resume` (resume.ResumeFolder): go on after its last saved round, and save each round.
    finetune.backend flower: the same rounds on Flower (flower/launch.py), logged there."""
    from edgetune.tasks import get_task

    task = get_task(task_name)
    clients = load_clients(partitions, task.target_column)
    if cfg.backend == "flower":
        from edgetune.federated.flower.launch import finetune_on_flower

        return finetune_on_flower(base_dir, partitions, task_name, cfg, out_dir, len(clients))
    sample_rate = cfg.sample_rate
    if cfg.spec.centralized:  # e.g. mezo: one client with all the data
        clients, sample_rate, cfg = centralize(clients, cfg)
    method, model = prepare(base_dir, task, cfg, len(clients), sample_rate)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state, history = run_federation(
        method, model, clients, num_rounds=cfg.num_rounds, sample_rate=sample_rate,
        seed=cfg.seed, checkpoint_dir=out_dir / "checkpoint", on_round=on_round,
        dropout=cfg.dropout, min_clients=cfg.min_clients, round_retries=cfg.round_retries,
        attack=attack_of(cfg, clients), resume=resume,
    )
    method.export(model, state, out_dir)
    epsilon = method.privacy.metrics()["dp_epsilon"] if method.privacy else None
    return summarize(history, cfg, trainable, len(clients), epsilon), history


def summarize(history: list[RoundLog], cfg: FinetuneParams, trainable: int, num_clients: int,
              dp_epsilon: float | None = None) -> dict:
    """The stage's metrics: losses, bytes, dropouts, trainable size, time (and epsilon with DP)."""
    summary = {
        "final_train_loss": history[-1].train_loss,
        "first_train_loss": history[0].train_loss,
        "bytes_up_per_client_round": history[-1].bytes_up_per_client,
        "bytes_down_per_client_round": history[-1].bytes_down_per_client,
        "bytes_per_client_round": history[-1].bytes_up_per_client + history[-1].bytes_down_per_client,
        "bytes_total": sum(h.bytes_exchanged for h in history),  # dropped clients: download only
        "clients_dropped": sum(len(h.dropped) for h in history),
        "trainable_params": trainable,
        "trainable_set": cfg.trainable_set,
        "seconds": sum(h.seconds for h in history),
        "num_clients": num_clients,
    }
    if dp_epsilon is not None:
        summary["dp_epsilon"] = dp_epsilon
    return summary


def plot_history(history: list[RoundLog], png: Path, csv: Path) -> None:
    """rounds.csv (for `dvc plots`) and a loss-per-round PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame([{"round": h.round, **h.metrics()} for h in history])
    frame.to_csv(csv, index=False)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(frame["round"], frame["train_loss"], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("train loss (client mean)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
