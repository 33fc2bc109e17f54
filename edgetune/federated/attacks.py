"""Simulated Byzantine clients (finetune.attack): a seeded choice of round(fraction x N) client
ids whose every reply is corrupted after their local work and before it is serialized, so the
bytes metered are the bytes they really send. Written by hand: no library we use simulates
attacks on these message formats.

What a reply's "update" is: for weight messages, each trained block minus the value the
client started from (the broadcast block, else the initial one); for seed-scalar messages,
the vector of scalars (projected gradients) it uploads.

    scaled          update x scale
    sign_flip       update x -scale (scale 1: a plain sign flip)
    random          Gaussian noise with the update's norm (seeded by seed, round, client)
    replayed_seeds  the reply of the last round the client was sampled in, resent (seed-scalar:
                    its old seeds and scalars; weights: its old update on today's start); the
                    first time it is sampled it replies honestly

Malformed replies, which the server must reject before aggregation (validation.py):
    nan             a NaN in the first float tensor
    wrong_shape     the first tensor one element short
    unknown_tensor  an extra tensor no method sends
    oversized       the first tensor repeated 64 times (a reply far above the method's size)
    bad_seed        seed-scalar: seeds shifted out of what an honest client draws (FedKSeed
                    indices past the K candidates, JOB seeds of another round)
    tampered        well-formed, one value changed after the client sealed its reply (a man
                    in the middle): only a MAC (finetune.zo.secret) tells it from an honest one
"""

from __future__ import annotations

import numpy as np
import torch

from edgetune.config import AttackParams
from edgetune.federated.protocol import Message

ATTACK_STREAM = 0xBAD_C0DE  # keeps the attack's entropy apart from every other stream


def malicious_clients(fraction: float, num_clients: int, seed: int) -> set[int]:
    """The round(fraction x num_clients) malicious client ids, a seeded choice."""
    k = int(round(fraction * num_clients))
    rng = np.random.default_rng([ATTACK_STREAM, seed])
    return set(rng.choice(num_clients, size=k, replace=False).tolist())


MALFORMED = ("nan", "wrong_shape", "unknown_tensor", "oversized", "bad_seed", "tampered")


def malformed(kind: str, reply: Message) -> Message:
    """`reply` corrupted so that no honest client could have sent it."""
    tensors = reply.tensors
    if kind == "unknown_tensor":
        return Message({**tensors, "backdoor": torch.zeros(16)}, reply.meta)
    if kind == "bad_seed":
        field = "index" if "index" in tensors else "seeds"
        shift = 1 << 30 if tensors[field].dtype == torch.int32 else 7 << 32
        return Message({**tensors, field: tensors[field] + shift}, reply.meta)
    floats = [k for k in sorted(tensors) if tensors[k].is_floating_point()]
    first = floats[0] if floats else sorted(tensors)[0]
    flat = tensors[first].reshape(-1)
    if kind in ("nan", "tampered"):
        bad = tensors[first].clone()
        bad.view(-1)[0] = float("nan") if kind == "nan" else bad.view(-1)[0] + 1
    else:  # wrong_shape: one element short; oversized: 64 times over
        bad = flat[:-1] if kind == "wrong_shape" else flat.repeat(64)
    return Message({**tensors, first: bad}, reply.meta)


class Attack:
    def __init__(self, cfg: AttackParams, num_clients: int, seed: int):
        self.cfg, self.seed = cfg, seed
        self.malicious = malicious_clients(cfg.fraction, num_clients, seed) if cfg.kind != "none" else set()
        self.previous: dict[int, dict[str, torch.Tensor]] = {}  # replayed_seeds: last honest update

    def corrupt(self, method, round_: int, client_id: int, down: Message, reply: Message) -> Message:
        """The reply a client sends: `reply` itself for an honest client."""
        if client_id not in self.malicious:
            return reply
        if self.cfg.kind in MALFORMED:
            return malformed(self.cfg.kind, reply)
        start = self.start_points(method, down, reply)
        update = {k: reply.tensors[k] - start[k] for k in start}
        if not update:
            return reply
        if self.cfg.kind == "replayed_seeds":
            seed_scalar = "grads" in reply.tensors
            honest = dict(reply.tensors) if seed_scalar else update
            old = self.previous.get(client_id)
            self.previous[client_id] = {k: v.clone() for k, v in honest.items()}
            if old is None:
                return reply
            if seed_scalar:
                return Message({**reply.tensors, **old}, reply.meta)
            update = old
        elif self.cfg.kind == "scaled":
            update = {k: u * self.cfg.scale for k, u in update.items()}
        elif self.cfg.kind == "sign_flip":
            update = {k: u * -self.cfg.scale for k, u in update.items()}
        elif self.cfg.kind == "random":
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [ATTACK_STREAM, self.seed, round_, client_id]).generate_state(1)[0]))
            noise = {k: torch.randn(u.shape, generator=gen, dtype=torch.float32) for k, u in update.items()}
            norm = lambda d: torch.sqrt(sum(v.double().pow(2).sum() for v in d.values()))
            factor = float(norm(update) / norm(noise).clamp(min=1e-30))
            update = {k: (n * factor).to(update[k].dtype) for k, n in noise.items()}
        return Message({**reply.tensors, **{k: start[k] + u for k, u in update.items()}}, reply.meta)

    @staticmethod
    def start_points(method, down: Message, reply: Message) -> dict[str, torch.Tensor]:
        """Per corruptible tensor of the reply, what its update is measured from."""
        if "grads" in reply.tensors:  # seed-scalar: the scalars are the update
            return {"grads": torch.zeros_like(reply.tensors["grads"])}
        blocks = getattr(method, "initial", {})
        return {k: down.tensors.get(k, blocks[k]) for k in reply.tensors if k in blocks}
