"""One federated setup for both backends: the clients, the method and its model, the engine's
options and the stage's summary, from the finetune params. The local backend (train.py), the
Flower ServerApp and ClientApp, the benchmarks and the tests all build a run through here."""

from __future__ import annotations

from pathlib import Path

from edgetune.config import BadInput, FinetuneParams, ModelParams
from edgetune.federated.engine import ClientData, RoundLog


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
    Returns (clients, sample_rate, cfg), cfg with that sample rate and those steps."""
    from edgetune.federated.engine import clients_per_round

    steps = cfg.local_steps * clients_per_round(len(clients), cfg.sample_rate)
    pooled = ClientData(0, [p for c in clients for p in c.prompts], [y for c in clients for y in c.targets])
    return [pooled], 1.0, cfg.model_copy(update={"local_steps": steps, "sample_rate": 1.0})


def prepare(base_dir: Path, task, cfg: FinetuneParams, num_clients: int, sample_rate: float,
            runtime: ModelParams | None = None):
    """(method, model) ready for the engine: the base model wrapped for the method (adapters
    seeded by finetune.seed), with finetune.dp's Gaussian mechanism and finetune.scaffold's
    control variates attached when on.
    The one place a federated model gets its device and precision (runtime: model.device and
    model.dtype; None = CPU float32): placed after the method wrapped it (peft's new weights
    move with it); backprop methods keep float32 weights under autocast (method.precision),
    zeroth-order ones load in model.dtype (devices.py says why)."""
    import torch

    from edgetune.config import clients_per_round
    from edgetune.devices import MixedPrecision, resolve, torch_dtype
    from edgetune.federated.methods import build_method
    from edgetune.federated.privacy import GaussianMechanism
    from edgetune.federated.scaffold import ControlVariates
    from edgetune.models import load_hf

    runtime = runtime or ModelParams(device="cpu")
    device = resolve(runtime.device)  # bad input (exit 2) before any loading
    backprop = cfg.spec.family == "weights"
    torch.manual_seed(cfg.seed)  # adapter init
    model, tok = load_hf(base_dir, dtype=torch.float32 if backprop else torch_dtype(runtime.dtype))
    method = build_method(cfg, tok, task, model)
    model = method.prepare_model(model)
    if device.type != "cpu":
        model.to(device)  # in place: the parameters a method keeps stay the model's
    if backprop:
        method.precision = MixedPrecision(device, runtime.dtype)
    if cfg.dp.enabled:
        method.privacy = GaussianMechanism(cfg.dp, cfg.seed, clients_per_round(num_clients, sample_rate),
                                           num_clients, cfg.min_clients if cfg.secagg.enabled else None)
    if cfg.scaffold:
        method.scaffold = ControlVariates(num_clients, cfg.local_steps, cfg.client_lr)
    return method, model


def attack_of(cfg: FinetuneParams, num_clients: int):
    """The simulated attackers of finetune.attack (attacks.Attack) among the clients, or None."""
    from edgetune.federated.attacks import Attack

    return Attack(cfg.attack, num_clients, cfg.seed) if cfg.attack.kind != "none" else None


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


def engine_options(cfg: FinetuneParams, clients) -> dict:
    """run_federation's keyword arguments from finetune.* (sampling, failures, attackers, secure
    aggregation; a Flower pool ignores the attack: its ClientApps corrupt their own replies)."""
    return {"num_rounds": cfg.num_rounds, "sample_rate": cfg.sample_rate, "seed": cfg.seed,
            "dropout": cfg.dropout, "min_clients": cfg.min_clients, "round_retries": cfg.round_retries,
            "attack": attack_of(cfg, len(clients)), "secagg": cfg.secagg if cfg.secagg.enabled else None}
