"""What every seed-scalar (MEFT) method shares: a client trains with MeZO steps and uploads
only (seed, projected-gradient) pairs; the global model is never sent, only rebuilt by
replaying pairs (edgetune/federated/zo.py) from the same starting weights.

In simulation all virtual clients share one model object. It always holds the current global
weights: the first client of a round replays the broadcast pairs onto it (`sync`), every client
snapshots the trainable weights before its local steps and copies them back afterwards, so
the next client starts from exactly the same global weights.

Every pair means z drawn by this run's sampler (finetune.zo.generator x distribution): its tag
rides in the checkpoint and, unless it is the original torch-cpu/gaussian stream, in every
message's meta "zo"; a party that meets another tag (or none where one is due) stops rather than
replay the pairs into other weights.

Subclasses say how seeds are chosen (`client_seeds`), what the server keeps and broadcasts
(`aggregate`, `downlink`) and how a broadcast becomes pairs to replay (`pairs_to_replay`).
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from edgetune.config import BadInput, RunFailed
from edgetune.federated import keys, zo
from edgetune.federated.engine import ClientData
from edgetune.federated.methods.base import FederatedMethod
from edgetune.federated.methods.weights import sample_batch
from edgetune.federated.protocol import Message
from edgetune.federated.trainable import prepare_trainable


class SeedScalarMethod(FederatedMethod):
    replays_history = True
    seed_field, seed_dtype = "seeds", torch.int64  # how a reply names its seeds

    def prepare_model(self, model):
        model = prepare_trainable(model, self.cfg.trainable_set, self.cfg, self.tok)
        model.eval()  # ZO needs no dropout noise between the +eps and -eps passes
        self.params = zo.trainable(model)
        self.model_round = 0  # the round whose global weights the model holds
        mask = zo.SparseMask(self.params, self.cfg.zo.sparsity) if self.cfg.zo.sparsity else None
        self.sampler = zo.Sampler(self.cfg.zo.generator, self.cfg.zo.distribution, key=self.cfg.zo.key(), mask=mask)
        return model

    # ----------------------------------------------------------------- which z a seed means
    def stamp(self, msg: Message) -> Message:
        """The sampler's tag in the message's meta; none for the original stream, so the
        default's messages (and their metered bytes) are as they were."""
        if self.sampler != zo.LEGACY:
            msg.meta["zo"] = self.sampler.tag
        return msg

    def check(self, tag: str | None, what: str) -> None:
        """Stop if `what` was made by another sampler than this run's (no tag: the original)."""
        if (tag or zo.LEGACY.tag) != self.sampler.tag:
            raise RunFailed(f"{what} was made with z sampler {tag or zo.LEGACY.tag}, this run uses "
                            f"{self.sampler.tag} (finetune.zo.generator / distribution): its seeds "
                            "would replay into other weights")

    # ----------------------------------------------------------------- authenticated messages
    def seal(self, msg: Message, round_: int) -> Message:
        """The sampler's tag, and with a federation key a MAC over the round and content
        (keys.message_mac): what every broadcast and reply leaves with."""
        msg = self.stamp(msg)
        if self.sampler.key:
            msg.meta["mac"] = keys.message_mac(self.sampler.key, round_, msg.tensors, msg.meta)
        return msg

    def mac_problem(self, msg: Message, round_: int) -> str | None:
        """With a federation key: why `msg` is not authentic for `round_` (None: it is)."""
        return keys.mac_problem(self.sampler.key, round_, msg.tensors, msg.meta) if self.sampler.key else None

    def downlink(self, state) -> Message:
        msg = self.broadcast(state)
        return self.seal(msg, int(msg.meta["round"]))

    # ----------------------------------------------------------------- client side
    def sync(self, model, down: Message) -> None:
        """Bring the shared model from round t-1 to round t by replaying the broadcast (a
        broadcast that fails its MAC is refused: the client fails, the round goes on)."""
        self.check(down.meta.get("zo"), "the broadcast")
        problem = self.mac_problem(down, int(down.meta["round"]))
        if problem:
            raise RunFailed(f"the broadcast of round {down.meta['round']} is refused: {problem}")
        target = int(down.meta["round"])
        if target == self.model_round:
            return
        if target != self.model_round + 1:
            raise RuntimeError(f"client at round {self.model_round} got round {target}: "
                               "replay the dictionary history (rebuild) to catch up")
        seeds, grads = self.pairs_to_replay(down)
        zo.replay(self.params, seeds, grads, self.cfg.zo_lr_at(target - 1), self.cfg.weight_decay, self.sampler)
        self.model_round = target

    @torch.no_grad()
    def client_update(self, model, down, data: ClientData, rng):
        self.sync(model, down)
        with zo.restored(self.params):  # back to the global weights for the next client
            seeds = self.client_seeds(down, data, rng)
            n, eps, lr = self.cfg.zo.samples, self.cfg.zo_eps, self.cfg.zo_lr_at(int(down.meta["round"]))
            grads, losses = [], []
            for step in range(self.cfg.local_steps):
                batch = self.objective.batch(*sample_batch(data, self.cfg.batch_size, rng))
                loss_fn = lambda: self.objective.loss(model, batch)
                step_seeds = seeds[step * n:(step + 1) * n]
                if n == 1:  # plain MeZO: the fused step
                    g, loss = zo.step(self.params, loss_fn, step_seeds[0], eps, lr, self.sampler)
                    estimates = [(g, loss)]
                else:  # n-SPSA: n estimates on the same batch, then their mean as one step
                    estimates = [zo.projected_gradient(self.params, loss_fn, s, eps, self.sampler)
                                 for s in step_seeds]
                    for s, (g, _) in zip(step_seeds, estimates):
                        zo.apply_update(self.params, s, g / n, lr, sampler=self.sampler)
                zo.decay(self.params, lr, self.cfg.weight_decay)
                grads += [g / n for g, _ in estimates]
                losses += [loss for _, loss in estimates]
        return self.seal(self.reply(seeds, grads, data, sum(losses) / len(losses)), int(down.meta["round"]) + 1)

    # ----------------------------------------------------------------- what a reply may hold
    def pairs_per_reply(self, down: Message) -> int:
        """How many (seed, scalar) pairs a client's reply to `down` carries."""
        return self.cfg.local_steps * self.cfg.zo.samples

    def expected_reply(self, down):
        n = self.pairs_per_reply(down)
        return {self.seed_field: ((n,), self.seed_dtype), "grads": ((n,), torch.float32)}

    def reply_problem(self, reply, down):
        """Also refused: pairs made by another z sampler, a MAC that does not match (with a
        federation key), and seeds this method never draws."""
        tag = reply.meta.get("zo") or zo.LEGACY.tag
        if tag != self.sampler.tag:
            return f"made with z sampler {tag}, this run uses {self.sampler.tag}"
        return (self.mac_problem(reply, int(down.meta["round"]) + 1) or super().reply_problem(reply, down)
                or self.seeds_problem(reply.tensors[self.seed_field], down))

    def seeds_problem(self, seeds: torch.Tensor, down: Message) -> str | None:
        """Why these seeds cannot come from an honest client (None: they can)."""
        return None

    # ----------------------------------------------------------------- method specifics
    @abstractmethod
    def broadcast(self, state) -> Message:
        """What the server sends (meta "round": the global state's round); `downlink` seals it."""

    @abstractmethod
    def client_seeds(self, down: Message, data: ClientData, rng: torch.Generator) -> list[int]:
        """The seeds of the local steps: local_steps x zo.samples of them, step by step."""

    @abstractmethod
    def reply(self, seeds: list[int], grads: list[float], data: ClientData, loss: float) -> Message:
        """The upload: the pairs in this method's wire format."""

    @abstractmethod
    def pairs_to_replay(self, down: Message) -> tuple[list[int], list[float]]:
        """(seeds, scalars) a client replays to apply one broadcast."""

    @abstractmethod
    def history(self, state) -> list[tuple[list[int], list[float]]]:
        """Per round, the (seeds, scalars) replayed: rebuilding = replaying all of them."""

    # ----------------------------------------------------------------- global model
    def rebuild(self, model, state, start: int = 0) -> None:
        """Replay the dictionary history after round `start` onto the model holding that round's
        weights; all of it onto the initial weights (a late joiner's catch-up, or an evaluator
        that never trained). Bit-identical to the synced model."""
        for round_, (seeds, grads) in enumerate(self.history(state)[start:], start):
            zo.replay(self.params, seeds, grads, self.cfg.zo_lr_at(round_), self.cfg.weight_decay, self.sampler)

    def apply_output(self, model, state) -> None:
        """The last global model, or with zo.average_rounds: k the mean of the last k rounds'
        global models (all of them when fewer rounds ran)."""
        self.apply_global(model, state)
        if self.cfg.zo.average_rounds:
            self.average_last_rounds(self.history(state), self.cfg.zo.average_rounds)

    @torch.no_grad()
    def average_last_rounds(self, rounds: list[tuple[list[int], list[float]]], k: int) -> None:
        """Tail averaging (Polyak & Juditsky 1992; Jain et al. 2018 for SGD's last iterates):
        from the last round R's weights to the mean of rounds R-k+1..R. Round s's update is in
        R - s of those k models, so it is replayed once more scaled by (R - s)/k - 1: no copy
        of the weights, exact up to float rounding without weight decay (config refuses it
        with decay). `rounds`: the history up to the round the model holds. Written here: no
        library averages seed-scalar histories."""
        last, k = len(rounds), min(k, len(rounds))
        for s in range(last - k + 1, last):  # round `last - k`'s update is in all k: weight 1
            seeds, grads = rounds[s]
            zo.replay(self.params, seeds, grads, self.cfg.zo_lr_at(s) * ((last - s) / k - 1), 0.0, self.sampler)

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "zo": self.sampler.tag}

    def restore(self, model, state, saved) -> None:
        """The shared model back at the saved round's global weights (a checkpoint without a
        sampler tag was written before there was a choice: torch-cpu/gaussian)."""
        self.check(saved.get("zo"), "the checkpoint")
        super().restore(model, state, saved)
        self.rebuild(model, state)
        self.model_round = int(self.downlink(state).meta["round"])

    def apply_global(self, model, state) -> None:
        version = int(self.downlink(state).meta["round"])
        if version > self.model_round + 1:  # a model no client ran for rounds (Flower's ServerApp,
            # from the start or from a restored round): replay the rounds it misses
            self.rebuild(model, state, self.model_round)
            self.model_round = version
            return
        self.sync(model, self.downlink(state))  # replay the last round's broadcast


def weights_of(replies: list[Message]) -> list[float]:
    """FedAvg weights: each client's share of the round's samples."""
    total = sum(r.meta["num_samples"] for r in replies)
    if total <= 0:
        raise BadInput("finetune: sampled clients hold no samples")
    return [r.meta["num_samples"] / total for r in replies]
