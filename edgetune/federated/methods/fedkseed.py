"""FedKSeed (Qin et al., ICML 2024): federated full-parameter tuning with zeroth-order steps
whose seeds come from K candidates fixed at the start. A client uploads (seed index, scalar)
pairs; the server keeps one accumulated scalar per candidate and broadcasts the K scalars; a
client rebuilds the global update by replaying the candidates with non-zero scalars.

FedKSeed-Pro samples seeds with probabilities from the magnitudes of their past scalars
(softmax over normalized importance, temperature zo.pro_temperature), so informative seeds are
drawn more often. Written by hand: no library implements either.
"""

from __future__ import annotations

import numpy as np
import torch

from edgetune.federated.aggregation import robust_scalars
from edgetune.federated.methods.seed_scalar import SeedScalarMethod, weights_of
from edgetune.federated.protocol import Message


def candidate_seeds(base: int, k: int) -> list[int]:
    seeds = np.random.SeedSequence([base, k]).generate_state(k, dtype=np.uint32).tolist()
    if len(set(seeds)) != k:  # astronomically unlikely; fail rather than alias two seeds
        raise ValueError("candidate seeds collide; change finetune.seed")
    return seeds


def seed_probabilities(importance: torch.Tensor, seen: torch.Tensor, temperature: float) -> torch.Tensor:
    """FedKSeed-Pro: softmax of importance / max importance; unseen seeds count as average."""
    if not seen.any():
        return torch.full_like(importance, 1 / len(importance))
    imp = importance.clone()
    imp[~seen] = importance[seen].mean()
    return torch.softmax(imp / imp.max().clamp(min=1e-12) / temperature, dim=0)


class FedKSeed(SeedScalarMethod):
    pro = False
    seed_field, seed_dtype = "index", torch.int32  # a reply names candidates by index

    def __init__(self, cfg, tok, objective):
        super().__init__(cfg, tok, objective)
        self.candidates = candidate_seeds(cfg.seed, cfg.zo.K)
        self.index_of = {s: i for i, s in enumerate(self.candidates)}

    def init_state(self, model):
        return {"history": torch.zeros(0, self.cfg.zo.K), "round": torch.tensor([0])}

    def broadcast(self, state):
        version = int(state["round"][0])
        tensors = {"scalars": state["history"][-1] if version else torch.zeros(0)}
        if self.pro:
            tensors["probs"] = self.probabilities(state).half()
        return Message(tensors, {"round": version})

    def probabilities(self, state) -> torch.Tensor:
        history = state["history"]
        seen = (history != 0).any(0)
        uses = (history != 0).sum(0).clamp(min=1)
        return seed_probabilities(history.abs().sum(0) / uses, seen, self.cfg.zo.pro_temperature)

    def client_seeds(self, down, data, rng):
        steps = self.cfg.local_steps * self.cfg.zo.samples
        if self.pro and "probs" in down.tensors:
            idx = torch.multinomial(down.tensors["probs"].float(), steps, replacement=True, generator=rng)
        else:
            idx = torch.randint(len(self.candidates), (steps,), generator=rng)
        return [self.candidates[i] for i in idx.tolist()]

    def reply(self, seeds, grads, data, loss):
        return Message({"index": torch.tensor([self.index_of[s] for s in seeds], dtype=torch.int32),
                        "grads": torch.tensor(grads, dtype=torch.float32)},
                       {"num_samples": len(data), "loss": loss})

    def seeds_problem(self, seeds, down):
        if len(seeds) and (int(seeds.min()) < 0 or int(seeds.max()) >= len(self.candidates)):
            return f"seed index outside the {len(self.candidates)} candidates"
        return None

    def aggregate(self, state, replies):
        for r in replies:
            self.check(r.meta.get("zo"), "a client's reply")
        scalars = torch.zeros(len(self.candidates))
        if self.privacy:  # clipped, summed, noised on every candidate, / planned clients (privacy.py)
            vectors = [{"s": scalars.index_add(0, r.tensors["index"].long(), r.tensors["grads"])} for r in replies]
            scalars = self.privacy.noisy_mean(vectors, {"s": scalars})["s"]
        elif self.cfg.aggregation.rule == "mean":
            for r, w in zip(replies, weights_of(replies)):
                scalars.index_add_(0, r.tensors["index"].long(), r.tensors["grads"] * w)
        else:  # robust: per candidate seed across clients (finetune.aggregation)
            vectors = torch.stack([scalars.index_add(0, r.tensors["index"].long(), r.tensors["grads"])
                                   for r in replies])
            drawn = torch.stack([scalars.index_add(0, r.tensors["index"].long(), torch.ones(len(r.tensors["index"])))
                                 for r in replies]) > 0
            scalars = robust_scalars(self.cfg.aggregation, vectors, weights_of(replies), drawn)
        return {"history": torch.cat([state["history"], scalars[None]]),
                "round": state["round"] + 1}

    def summand(self, reply, down):
        """Secure aggregation sums the scalars over the K candidates, as `aggregate` does."""
        scalars = torch.zeros(len(self.candidates), dtype=torch.float64)
        yield scalars.index_add_(0, reply.tensors["index"].long(), reply.tensors["grads"].double())

    def summand_size(self, down):
        return len(self.candidates)

    def from_mean(self, mean, down, meta):
        drawn = torch.nonzero(mean).flatten()
        return self.stamp(Message({"index": drawn.to(torch.int32), "grads": mean[drawn].float()}, meta))

    def replay_pairs(self, scalars: torch.Tensor) -> tuple[list[int], list[float]]:
        nonzero = torch.nonzero(scalars).flatten().tolist()
        return [self.candidates[j] for j in nonzero], scalars[nonzero].tolist()

    def pairs_to_replay(self, down):
        return self.replay_pairs(down.tensors["scalars"])

    def history(self, state):
        return [self.replay_pairs(row) for row in state["history"]]


class FedKSeedPro(FedKSeed):
    pro = True
