"""The finetune stage's backend choice: the local engine (every client in this process) or
Flower (flower/launch.py); both set a run up through setup.py. Also the stage's round plot."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgetune.config import FinetuneParams, ModelParams
from edgetune.federated.engine import RoundLog, run_federation
from edgetune.federated.setup import centralize, engine_options, load_clients, prepare, summarize


def finetune(base_dir: Path, partitions: Path, task_name: str, cfg: FinetuneParams, out_dir: Path,
             on_round: Callable[[RoundLog], None] | None = None,
             resume=None, runtime: ModelParams | None = None) -> tuple[dict, list[RoundLog]]:
    """`resume` (resume.ResumeFolder): go on after its last saved round, and save each round.
    finetune.backend flower: the same rounds on Flower (flower/launch.py), logged there.
    runtime: model.device / model.dtype (None: CPU float32)."""
    from edgetune.tasks import get_task

    task = get_task(task_name)
    clients = load_clients(partitions, task.target_column)
    if cfg.backend == "flower":
        from edgetune.federated.flower.launch import finetune_on_flower

        return finetune_on_flower(base_dir, partitions, task_name, cfg, out_dir, len(clients), resume, runtime)
    if cfg.spec.centralized:  # e.g. mezo: one client with all the data
        clients, _, cfg = centralize(clients, cfg)
    method, model = prepare(base_dir, task, cfg, len(clients), cfg.sample_rate, runtime)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state, history = run_federation(method, model, clients, checkpoint_dir=out_dir / "checkpoint",
                                    on_round=on_round, resume=resume, **engine_options(cfg, clients))
    method.export(model, state, out_dir)
    epsilon = method.privacy.metrics()["dp_epsilon"] if method.privacy else None
    return {**summarize(history, cfg, trainable, len(clients), epsilon), **gpu_memory(model)}, history


def gpu_memory(model) -> dict:
    """On CUDA, the stage's peak GPU memory (devices.peak_memory) beside its RSS; {} on a CPU."""
    from edgetune.devices import peak_memory

    device = next(model.parameters()).device
    if device.type != "cuda":
        return {}
    return {k: v for k, v in peak_memory(device).items() if k != "peak_rss_mb"}


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
