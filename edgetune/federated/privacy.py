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

With secure aggregation (finetune.secagg, secagg.py) the server never sees a reply, so the
clients clip their own updates (`client_share`, the client-side fixed clipping that Flower pairs
with SecAgg+) and send them weighted 1/m; the unmasked sum is then the clipped sum / m, and the
noise comes from one of two places (dp.noise):
- `server`: the server adds N(0, (noise_multiplier x clip)^2) to the unmasked sum, as without
  secagg. The server learns the exact sum of at least min_clients clipped updates, nothing else.
- `clients`: distributed DP. Each client adds its share N(0, (noise_multiplier x clip)^2 / t),
  t = finetune.min_clients, before masking. A round aggregates k >= t replies, so the sum carries
  noise of variance k/t >= 1 times the central mechanism's and the server only ever sees noised
  sums (Kairouz et al., "The Distributed Discrete Gaussian Mechanism for Federated Learning with
  Secure Aggregation", ICML 2021, with continuous Gaussian shares in 2^-24 fixed point). The
  accountant counts noise_multiplier, the least the sum carries: with k > t replies the real
  epsilon is lower than reported; min_clients = the clients per round makes it exact and makes
  any dropout fail the round (round_retries apply). Shares are drawn from finetune.seed, the
  client and the round (dp.noise_entropy: seed) so a run reproduces, which also lets a server
  that knows the params regenerate them; dp.noise_entropy: device draws each share from the
  device's own entropy (secrets), so only the noised sum ever exists outside a client.

What is not covered: methods whose clients never share a seed (JOB, FwdLLM, MeZO) have no sum
to noise and are rejected by the params check; which candidate seeds a FedKSeed client drew is
public randomness, not data. Noise on all K candidates makes every candidate non-zero, so a
client replays K seeds per round: use a small zo.K or trainable: lora with DP.

Written by hand: the clip-and-noise step is a few lines on edgetune's messages (opacus privatizes
per-sample gradients of one model, not federated updates); only the accountant is opacus's.
"""

from __future__ import annotations

import math
import secrets
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
    noised (its only state, saved for resume) for the accountant and the noise stream.
    `min_clients` given: secure aggregation is on, the clients clip (client_share) and the
    server's one update is their unmasked sum / m."""

    def __init__(self, cfg: PrivacyParams, seed: int, clients_per_round: int, num_clients: int,
                 min_clients: int | None = None):
        self.cfg, self.seed = cfg, seed
        self.m = clients_per_round
        self.sample_rate = clients_per_round / num_clients
        self.min_clients = min_clients
        self.rounds = 0

    # ----------------------------------------------------------------- client side (with secagg)
    def client_share(self, summand, client_id: int, round_: int, attempt: int):
        """The client's summand (`summand()`: a fresh generator of float64 CPU tensors, read twice,
        one tensor at a time: once for the norm) scaled to L2 norm <= clip, plus with dp.noise:
        clients its share of the noise, std noise_multiplier x clip / sqrt(min_clients)."""
        factor = clip(summand(), self.cfg.clip)
        gen, std = None, self.cfg.noise_multiplier * self.cfg.clip / math.sqrt(self.min_clients)
        if self.cfg.noise == "clients":
            gen = torch.Generator().manual_seed(self.share_seed(client_id, round_, attempt))
        for part in summand():
            part.mul_(factor)
            if gen is not None:
                part.add_(torch.randn(part.shape, generator=gen, dtype=torch.float64), alpha=std)
            yield part

    def share_seed(self, client_id: int, round_: int, attempt: int) -> int:
        if self.cfg.noise_entropy == "device":
            return secrets.randbits(63)
        words = [DP_STREAM, self.seed, client_id, round_, attempt]
        return int(np.random.SeedSequence(words).generate_state(1)[0])

    # ----------------------------------------------------------------- server side

    def noise_generator(self) -> torch.Generator:
        entropy = np.random.SeedSequence([DP_STREAM, self.seed, self.rounds]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(entropy))

    def noisy_mean(self, updates: list[dict[str, torch.Tensor]],
                   shapes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(sum of clipped updates + noise) / m for every tensor of `shapes` (the whole trainable
        set; a block a client did not send counts as no change). Under secure aggregation
        `updates` is one: the unmasked sum / m of the updates the clients clipped (summed_mean)."""
        if self.min_clients is not None:
            return self.summed_mean(updates, shapes)
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

    def summed_mean(self, updates, shapes):
        """The clients' unmasked sum / m, with dp.noise: server the server's noise added as
        noisy_mean adds it (the same stream: the same draws as without secagg)."""
        if len(updates) != 1:
            raise RuntimeError("finetune.dp was set up for secure aggregation, but the round's replies "
                               "came unmasked: run the federation with setup.engine_options(cfg)")
        (mean,) = updates
        gen = self.noise_generator() if self.cfg.noise == "server" else None
        std = self.cfg.noise_multiplier * self.cfg.clip
        out = {}
        for key in sorted(shapes):
            total = mean[key].float() if key in mean else torch.zeros(shapes[key].shape)
            if gen is not None:
                total = (total * self.m + std * torch.randn(total.shape, generator=gen)) / self.m
            out[key] = total.to(shapes[key].dtype)
        self.rounds += 1
        return out

    def metrics(self) -> dict[str, float]:
        """Per round: epsilon spent so far at delta."""
        return {"dp_epsilon": epsilon(self.cfg.noise_multiplier, self.sample_rate, self.rounds,
                                      self.cfg.delta)}
