"""Client-level differential privacy (finetune.dp): the Gaussian mechanism of DP-FedAvg
(McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018), for
weight messages and for the seed-scalar messages of FedKSeed.

Per round, each replying client's update is clipped to L2 norm `clip` (weights: its trained
blocks minus the global ones, one norm over all blocks; FedKSeed: its scalars scattered over the
K shared candidate seeds); the server sums the clipped updates, adds N(0, (noise_multiplier x
clip)^2) to every coordinate of the trainable set (every block, every candidate seed) and
divides by the round's planned client count m (the fixed-denominator estimator: one client moves
the mean by at most clip / m, whoever else replied). The noisy mean then goes through the
method's server step as the plain mean would.

epsilon at `delta` after t rounds comes from opacus's RDP accountant for the sampled Gaussian
mechanism at q = m / clients (uniform sampling of m clients is accounted as Poisson sampling at
that rate, the usual approximation). Central DP: the server is trusted to add the noise; the
replies themselves are not noised (pair with secure aggregation to hide them from the server).

What is not covered: methods whose clients never share a seed (JOB, FwdLLM, MeZO) have no sum
to noise and are rejected by the params check; which candidate seeds a FedKSeed client drew is
public randomness, not data. Noise on all K candidates makes every candidate non-zero, so a
client replays K seeds per round: use a small zo.K or trainable: lora with DP.

Written by hand: the clip-and-noise step is a few lines on edgetune's messages (opacus privatizes
per-sample gradients of one model, not federated updates); only the accountant is opacus's.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from edgetune.config import PrivacyParams
from edgetune.federated.aggregation import clip

DP_STREAM = 0xD1FF_5EED  # keeps the noise's entropy apart from every other stream
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))  # RDP orders searched


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """epsilon of `rounds` sampled Gaussian mechanisms at `delta` (opacus RDP accountant)."""
    from opacus.accountants import RDPAccountant

    if rounds == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": eps is then loose, not wrong
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta, alphas=ALPHAS))


class GaussianMechanism:
    """Clip, sum, noise and average the clients' updates of one round; counts the rounds it
    noised (its only state, saved for resume) for the accountant and the noise stream."""

    def __init__(self, cfg: PrivacyParams, seed: int, clients_per_round: int, num_clients: int):
        self.cfg, self.seed = cfg, seed
        self.m = clients_per_round
        self.sample_rate = clients_per_round / num_clients
        self.rounds = 0

    def noise_generator(self) -> torch.Generator:
        entropy = np.random.SeedSequence([DP_STREAM, self.seed, self.rounds]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(entropy))

    def noisy_mean(self, updates: list[dict[str, torch.Tensor]],
                   shapes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(sum of clipped updates + noise) / m for every tensor of `shapes` (the whole trainable
        set; a block a client did not send counts as no change)."""
        gen = self.noise_generator()
        factors = [clip(list(u.values()), self.cfg.clip) for u in updates]
        std = self.cfg.noise_multiplier * self.cfg.clip
        out = {}
        for key in sorted(shapes):
            total = torch.zeros(shapes[key].shape, dtype=torch.float32)
            for update, factor in zip(updates, factors):
                if key in update:
                    total += factor * update[key].float()
            total += std * torch.randn(total.shape, generator=gen)
            out[key] = (total / self.m).to(shapes[key].dtype)
        self.rounds += 1
        return out

    def metrics(self) -> dict[str, float]:
        """Per round: epsilon spent so far at delta."""
        return {"dp_epsilon": epsilon(self.cfg.noise_multiplier, self.sample_rate, self.rounds,
                                      self.cfg.delta)}
