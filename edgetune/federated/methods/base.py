"""The one interface every federated method implements.

A method answers three questions and nothing else (the engine owns rounds, sampling, bytes):
  1. what a client sends after local work      -> client_update
  2. how the server folds replies into a state -> aggregate (+ downlink: what it broadcasts)
  3. how a global state becomes model weights  -> init_state / export
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from edgetune.config import BadInput, FinetuneParams
from edgetune.federated import registry, validation
from edgetune.federated.engine import ClientData
from edgetune.federated.protocol import Message
from edgetune.federated.trainable import save_model


class FederatedMethod(ABC):
    name: str = "?"  # name and centralized: set from the method's registry spec (registry.load)
    centralized = False  # True: one client holds all the data (e.g. mezo)
    replays_history = False  # True: a client rebuilds the global model from every broadcast so far
    privacy = None  # privacy.GaussianMechanism when finetune.dp is on (set by setup.prepare)
    precision = None  # devices.MixedPrecision of a backprop method (set by setup.prepare)

    def __init__(self, cfg: FinetuneParams, tok, objective):
        self.cfg = cfg
        self.tok = tok
        self.objective = objective  # edgetune.objectives: batch(prompts, targets), loss(model, batch)

    def loss(self, model, prompts: list[str], targets: list) -> torch.Tensor:
        return self.objective.loss(model, self.objective.batch(prompts, targets))

    @abstractmethod
    def prepare_model(self, model):
        """Return the model clients train (e.g. wrapped with LoRA adapters)."""

    @abstractmethod
    def init_state(self, model) -> dict[str, torch.Tensor]:
        """The server's initial global state."""

    @abstractmethod
    def downlink(self, state: dict[str, torch.Tensor]) -> Message:
        """What the server broadcasts to each sampled client."""

    @abstractmethod
    def client_update(self, model, down: Message, data: ClientData,
                      rng: torch.Generator) -> Message:
        """Local work on one client; the reply must carry meta num_samples and loss."""

    @abstractmethod
    def aggregate(self, state: dict[str, torch.Tensor], replies: list[Message]) -> dict[str, torch.Tensor]:
        """Fold the clients' replies into the next global state."""

    @abstractmethod
    def expected_reply(self, down: Message) -> validation.Expected:
        """The tensors (name -> shape, dtype) a client may send in reply to `down`."""

    def personal(self, client_id: int) -> Message | None:
        """Tensors for one sampled client only, sent beside the broadcast and merged into it on
        the client (SCAFFOLD's correction, scaffold.py); None: the broadcast is all it gets."""
        return None

    # ----------------------------------------------------------------- secure aggregation (secagg.py)
    def summand(self, reply: Message, down: Message):
        """What `reply` adds to the round's sum under finetune.secagg: fresh float64 CPU tensors,
        one at a time (config.secagg_fits admits only methods that define it)."""
        raise NotImplementedError(f"{self.name}'s replies have no sum the server could fold")

    def summand_size(self, down: Message) -> int:
        """How many numbers `summand` yields for a reply to `down`."""
        raise NotImplementedError(f"{self.name}'s replies have no sum the server could fold")

    def from_mean(self, mean: torch.Tensor, down: Message, meta: dict) -> Message:
        """The one reply that the clients' sample-weighted mean summand stands for (`meta`: the
        round's total num_samples and mean loss), for `aggregate` to fold like the plain mean."""
        raise NotImplementedError(f"{self.name}'s replies have no sum the server could fold")

    def required_reply(self, down: Message) -> tuple[str, ...]:
        """The tensors every reply to `down` must carry (default: all it may send)."""
        return tuple(self.expected_reply(down))

    def reply_problem(self, reply: Message, down: Message) -> str | None:
        """Why a client's reply to `down` must not reach `aggregate` (validation.py), None
        when it may: checked by the engine for every reply, on every backend."""
        return validation.reply_problem(reply, self.expected_reply(down), self.required_reply(down))

    def round_metrics(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Method-specific numbers to log after each round (with DP: epsilon spent so far)."""
        return self.privacy.metrics() if self.privacy else {}

    def checkpoint_state(self) -> dict:
        """What the method keeps across rounds outside the global state (saved for resume)."""
        return {"dp_rounds": self.privacy.rounds} if self.privacy else {}

    def restore(self, model, state: dict[str, torch.Tensor], saved: dict) -> None:
        """Resume after a saved round: `state` is its global state, `saved` checkpoint_state()."""
        if self.privacy:
            self.privacy.rounds = saved["dp_rounds"]

    @abstractmethod
    def apply_global(self, model, state: dict[str, torch.Tensor]) -> None:
        """Put the global state's weights into the model (for evaluation or export)."""

    def apply_output(self, model, state: dict[str, torch.Tensor]) -> None:
        """Put the weights the stage saves into the model: the last global model's here."""
        self.apply_global(model, state)

    def export(self, model, state: dict[str, torch.Tensor], out_dir) -> None:
        """Write the final model as an HF folder out_dir/merged that from_pretrained loads."""
        self.apply_output(model, state)
        save_model(model, self.tok, Path(out_dir) / "merged")


def get_method(name: str) -> type[FederatedMethod]:
    """The registered method's class (its module imported now)."""
    try:
        spec = registry.lookup(name)
    except ValueError as e:
        raise BadInput(str(e)) from None
    return spec.load()
