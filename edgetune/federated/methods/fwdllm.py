"""FwdLLM (Xu et al., USENIX ATC 2024): federated PEFT (LoRA) with perturbed-forward gradients.

Each local step estimates the gradient from n perturbations, each chosen among `candidates`
seeds as the one whose z is most aligned (largest |cosine|) with the previous global update
direction; the step applies the n estimates averaged. Clients upload the (seed, g / n) pairs;
the server merges them like JOB, and after each round grows n by one when the variance of the
received projected gradients exceeds `var_threshold`, or shrinks it by one otherwise
(1 <= n <= max_perturbations). Written by hand: no library implements it.

Needs a small trainable set (LoRA): candidates are materialized to compare directions.
"""

from __future__ import annotations

import torch

from edgetune.federated import zo
from edgetune.federated.methods.weights import sample_batch
from edgetune.federated.methods.job import JOB, job_seed


class FwdLLM(JOB):
    direction: torch.Tensor | None = None  # previous global update direction (sum of g z)

    def init_state(self, model):
        return {**super().init_state(model), "n": torch.tensor([self.cfg.zo.perturbations])}

    def broadcast(self, state):
        msg = super().broadcast(state)
        msg.tensors["n"] = state["n"]
        return msg

    def sync(self, model, down):
        before = self.model_round
        super().sync(model, down)
        if self.model_round != before:  # new global pairs: their sum is the new direction
            self.set_direction(down)

    def restore(self, model, state, saved):
        super().restore(model, state, saved)
        if self.model_round:  # the direction sync would have left: the last round's pairs
            self.set_direction(self.downlink(state))

    def set_direction(self, down) -> None:
        """The search direction: the sum of the last round's global (seed, scalar) pairs."""
        seeds, grads = self.pairs_to_replay(down)
        self.direction = sum(g * zo.materialize(self.params, s, self.sampler) for s, g in zip(seeds, grads))

    def pick(self, candidate_seeds: list[int]) -> int:
        if not isinstance(self.direction, torch.Tensor):
            return candidate_seeds[0]
        d = self.direction
        score = [abs(torch.nn.functional.cosine_similarity(zo.materialize(self.params, s, self.sampler), d, dim=0))
                 for s in candidate_seeds]
        return candidate_seeds[int(torch.stack(score).argmax())]

    @torch.no_grad()
    def client_update(self, model, down, data, rng):
        self.sync(model, down)
        with zo.restored(self.params):  # back to the global weights for the next client
            n, c, max_n = int(down.tensors["n"][0]), self.cfg.zo.candidates, self.cfg.zo.max_perturbations
            playing = int(down.meta["round"]) + 1
            seeds, grads, losses = [], [], []
            for step in range(self.cfg.local_steps):
                batch = self.objective.batch(*sample_batch(data, self.cfg.batch_size, rng))
                loss_fn = lambda: self.objective.loss(model, batch)
                chosen = [self.pick([job_seed(self.cfg.seed, playing, data.client_id,
                                              (step * max_n + p) * c + k) for k in range(c)])
                          for p in range(n)]
                estimates = [zo.projected_gradient(self.params, loss_fn, s, self.cfg.zo_eps, self.sampler)
                             for s in chosen]
                for s, (g, _) in zip(chosen, estimates):  # the step: mean of the n estimates
                    zo.apply_update(self.params, s, g / n, self.cfg.zo_lr_at(playing - 1),
                                    self.cfg.weight_decay, self.sampler)
                seeds += chosen
                grads += [g / n for g, _ in estimates]
                losses += [loss for _, loss in estimates]
        return self.seal(self.reply(seeds, grads, data, sum(losses) / len(losses)), playing)

    def pairs_per_reply(self, down):
        return self.cfg.local_steps * int(down.tensors["n"][0])

    def client_seeds(self, down, data, rng):  # unused: client_update picks seeds per step
        raise NotImplementedError

    def aggregate(self, state, replies):
        n = int(state["n"][0])
        merged = super().aggregate(state, replies)
        # variance of the clients' raw projected gradients (uploads carry g / n)
        raw = torch.cat([r.tensors["grads"] for r in replies]) * n
        grow = raw.numel() > 1 and raw.var().item() > self.cfg.zo.var_threshold
        n = min(n + 1, self.cfg.zo.max_perturbations) if grow else max(n - 1, 1)
        merged["n"] = torch.tensor([n])
        merged["variance"] = raw.var().reshape(1) if raw.numel() > 1 else torch.zeros(1)
        return merged

    def round_metrics(self, state):
        return {"perturbations": float(state["n"][0]), "scalar_variance": float(state["variance"][0])}
