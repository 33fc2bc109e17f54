"""JOB, "Just One Byte (per gradient)" (Zelikman et al., 2023): federated MeZO where each client
uploads the (seed, scalar) pair of every local step, seeds built from (seed, round, client,
step) so none is ever reused; the server merges all pairs into one global dictionary and
broadcasts each round's new pairs; every client replays them to reach the same weights, and a
late joiner replays the whole history. Written by hand: no library implements it.
"""

from __future__ import annotations

import torch

from edgetune.federated.aggregation import clip
from edgetune.federated.methods.seed_scalar import SeedScalarMethod, weights_of
from edgetune.federated.protocol import Message

FIELD = 1 << 16  # round, client id and step each get 16 bits of the seed


def job_seed(base: int, round_: int, client_id: int, step: int) -> int:
    """A seed unique to (base, round, client, step): a bijection while each is < 2**16."""
    if max(round_, client_id, step, base) >= FIELD:
        raise ValueError("JOB seeds need round, client id, step and seed below 65536")
    return ((base * FIELD + round_) * FIELD + client_id) * FIELD + step


class JOB(SeedScalarMethod):
    def init_state(self, model):
        return {"seeds": torch.zeros(0, dtype=torch.int64), "grads": torch.zeros(0),
                "round_of": torch.zeros(0, dtype=torch.int32), "round": torch.tensor([0])}

    def broadcast(self, state):
        version = int(state["round"][0])
        new = state["round_of"] == version
        return Message({"seeds": state["seeds"][new], "grads": state["grads"][new]}, {"round": version})

    def client_seeds(self, down, data, rng):
        playing = int(down.meta["round"]) + 1
        return [job_seed(self.cfg.seed, playing, data.client_id, s)
                for s in range(self.cfg.local_steps * self.cfg.zo.samples)]

    def seeds_problem(self, seeds, down):
        """A JOB seed names its round (job_seed): pairs of another round are a replay."""
        playing = int(down.meta["round"]) + 1
        rounds = seeds // (FIELD * FIELD) - self.cfg.seed * FIELD
        if bool((rounds != playing).any()):
            return f"seeds of round(s) {sorted(set(rounds.tolist()))[:3]}, not of round {playing}"
        return None

    def reply(self, seeds, grads, data, loss):
        return Message({"seeds": torch.tensor(seeds, dtype=torch.int64),
                        "grads": torch.tensor(grads, dtype=torch.float32)},
                       {"num_samples": len(data), "loss": loss})

    def aggregate(self, state, replies):
        version = int(state["round"][0]) + 1
        for r in replies:
            self.check(r.meta.get("zo"), "a client's reply")
        seeds = torch.cat([r.tensors["seeds"] for r in replies])
        # FedAvg of the clients' updates: each client's scalars scaled by its sample share.
        # clipped_mean (finetune.aggregation): each client's scalars first clipped to norm tau.
        clipped = self.cfg.aggregation.rule == "clipped_mean"
        grads = torch.cat([r.tensors["grads"] * (clip(r.tensors["grads"], self.cfg.aggregation.tau) * w
                                                 if clipped else w)
                           for r, w in zip(replies, weights_of(replies))])
        return {"seeds": torch.cat([state["seeds"], seeds]),
                "grads": torch.cat([state["grads"], grads]),
                "round_of": torch.cat([state["round_of"], torch.full((len(seeds),), version, dtype=torch.int32)]),
                "round": torch.tensor([version])}

    def pairs_to_replay(self, down):
        return down.tensors["seeds"].tolist(), down.tensors["grads"].tolist()

    def history(self, state):
        rounds = state["round_of"]
        return [(state["seeds"][rounds == v].tolist(), state["grads"][rounds == v].tolist())
                for v in range(1, int(state["round"][0]) + 1)]
