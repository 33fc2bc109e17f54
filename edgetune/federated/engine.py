"""The round loop, once for every federated method (nanoGPT-style: one loop, commented phases).

Per round: (1) sample clients, (2) broadcast the global state as a serialized message,
(3) each sampled client does its local work and replies with a serialized message,
(4) the method aggregates the replies into the next global state, (5) checkpoint and log.
A method (see methods/base.py) only says what a client sends, how the server folds replies,
and how the global state becomes model weights; it never owns a loop over rounds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from edgetune.federated.protocol import Message, from_bytes, to_bytes


@dataclass
class ClientData:
    """One client's local data: prompts and their targets (integer labels for classification,
    answer strings for generation)."""

    client_id: int
    prompts: list[str]
    targets: list

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class RoundLog:
    round: int
    clients: list[int]
    train_loss: float  # sample-weighted mean of the clients' local losses
    bytes_up_per_client: float
    bytes_down_per_client: float
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)  # method-specific, e.g. FwdLLM's n

    def metrics(self) -> dict[str, float]:
        d = asdict(self)
        d.pop("clients")
        d.pop("round")
        d.update(d.pop("extra"))
        d["num_clients"] = len(self.clients)
        return d


def clients_per_round(num_clients: int, rate: float) -> int:
    return max(1, round(rate * num_clients))


def sample_clients(rng: np.random.Generator, num_clients: int, rate: float) -> list[int]:
    """Uniform sampling without replacement of max(1, round(rate * N)) clients."""
    k = clients_per_round(num_clients, rate)
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def client_generator(seed: int, round_: int, client_id: int) -> torch.Generator:
    """A client's RNG for one round, derived from (seed, round, client) alone: reproducible
    whatever order or process clients run in."""
    entropy = np.random.SeedSequence([seed, round_, client_id]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(entropy))


def save_checkpoint(state: dict[str, torch.Tensor], round_: int, folder: Path) -> None:
    """Write the global state after a round; write-then-rename so a crash leaves the old one."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "global.tmp"
    tmp.write_bytes(to_bytes(Message(state, {"round": round_})))
    tmp.replace(folder / "global.safetensors")


def run_federation(method, model, clients: list[ClientData], *, num_rounds: int,
                   sample_rate: float, seed: int, checkpoint_dir: Path | None = None,
                   on_round: Callable[[RoundLog], None] | None = None):
    """Run all rounds; returns (final global state, list of RoundLog)."""
    rng = np.random.default_rng(seed)
    state = method.init_state(model)
    history: list[RoundLog] = []
    bar = tqdm(range(1, num_rounds + 1), desc=f"{method.name} rounds", unit="round")
    for rnd in bar:
        t0 = time.perf_counter()
        # 1) sample this round's clients
        sampled = sample_clients(rng, len(clients), sample_rate)
        # 2) broadcast: every sampled client decodes the same bytes
        down = to_bytes(method.downlink(state))
        # 3) local work on each client; only the serialized reply reaches the server
        replies, up_sizes = [], []
        for cid in sampled:
            client_rng = client_generator(seed, rnd, cid)
            reply = method.client_update(model, from_bytes(down), clients[cid], client_rng)
            wire = to_bytes(reply)
            up_sizes.append(len(wire))
            replies.append(from_bytes(wire))
        # 4) aggregate into the next global state
        state = method.aggregate(state, replies)
        # 5) checkpoint and log
        if checkpoint_dir is not None:
            save_checkpoint(state, rnd, checkpoint_dir)
        weights = np.array([r.meta["num_samples"] for r in replies], dtype=float)
        losses = np.array([r.meta["loss"] for r in replies], dtype=float)
        log = RoundLog(
            round=rnd, clients=sampled,
            train_loss=float((weights * losses).sum() / weights.sum()),
            bytes_up_per_client=float(np.mean(up_sizes)),
            bytes_down_per_client=float(len(down)),
            seconds=time.perf_counter() - t0,
            extra=method.round_metrics(state),
        )
        history.append(log)
        bar.set_postfix(loss=f"{log.train_loss:.4f}")
        if on_round is not None:
            on_round(log)
    return state, history
