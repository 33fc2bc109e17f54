"""Byzantine-robust aggregation of the clients' replies (finetune.aggregation).

    mean          the sample-weighted mean (FedAvg): `mean_per_key` for weight blocks,
                  seed-scalar methods fold their own scalars
    median        per coordinate median over clients                (flwr aggregate_median)
    trimmed_mean  per coordinate mean after cutting beta per side   (flwr aggregate_trimmed_avg)
    krum          the krum_keep replies with the least summed squared distance to their n-f-2
                  nearest others, averaged: Multi-Krum (El Mhamdi et al., ICML 2018) with
                  n-f kept by default, Krum (Blanchard et al., NeurIPS 2017) with 1
                                                                    (flwr aggregate_krum)
    clipped_mean  each client's update clipped to norm tau, then the sample-weighted mean
                  (written by hand: flwr has no clipping aggregate; the mean is flwr's aggregate)

Weight messages (`robust_blocks`): the coordinate rules run block by block over the clients that
sent the block; Krum and clipping see a client's whole update (all the blocks it sent; a block it
did not send counts as no change). Median, trimmed mean and Krum ignore sample counts.

Seed-scalar messages (`robust_scalars`): one vector per client, its scalars indexed by seeds the
clients share (FedKSeed's K candidates; a candidate a client did not draw is 0). Median and
trimmed mean run seed by seed over the clients that drew the seed (a 0 from a client that never
drew it is no vote), scaled by those clients' sample share, so that a seed everyone drew with
the same scalar gets exactly the mean's value. Any beta x n of the round's n clients may be
Byzantine and may all have drawn the same seed, so the trimmed mean cuts that many votes per
side of every seed, and takes the median of the votes where that would cut them all. A seed
with fewer than MIN_VOTES votes is left out of the round (the median of one or two votes is
one client's choice): these rules need seeds drawn by several clients (a small zo.K, many
local steps), else they learn nothing.
Krum and clipping see each client's whole vector. Clients that never share a seed (JOB,
FwdLLM) admit only clipping (`clip`): their vectors have no common coordinates.
"""

from __future__ import annotations

import numpy as np
import torch

from edgetune.config import AggregationParams
from edgetune.federated.protocol import Message


def update_norm(update) -> float:
    """The L2 norm of an update (one tensor, or several in any iterable: one norm over all, read
    one at a time), in float64."""
    parts = [update] if isinstance(update, torch.Tensor) else update
    return float(torch.sqrt(sum(p.double().pow(2).sum() for p in parts)))


def clip(update, tau: float) -> float:
    """The factor min(1, tau / ||update||) that brings an update to norm at most tau."""
    norm = update_norm(update)
    return min(1.0, tau / norm) if norm > 0 else 1.0


def weighted_mean(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """FedAvg: the sample-weighted mean of each tensor, via Flower's aggregate()."""
    from flwr.server.strategy.aggregate import aggregate

    keys = list(states[0])
    arrays = [([s[k].float().numpy() for k in keys], int(w)) for s, w in zip(states, weights)]
    averaged = aggregate(arrays)
    return {k: torch.from_numpy(a).to(states[0][k].dtype) for k, a in zip(keys, averaged)}


def mean_per_key(replies: list[Message]) -> dict[str, torch.Tensor]:
    """Per block, the sample-weighted mean over the clients that sent it."""
    keys = sorted({k for r in replies for k in r.tensors})
    out = {}
    for key in keys:
        senders = [r for r in replies if key in r.tensors]
        out.update(weighted_mean([{key: r.tensors[key]} for r in senders],
                                 [r.meta["num_samples"] for r in senders]))
    return out


def robust_arrays(cfg: AggregationParams, results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Fold clients' (arrays, num_samples) by a robust rule other than clipped_mean."""
    from flwr.server.strategy import aggregate as fl

    if cfg.rule == "median":
        return fl.aggregate_median(results)
    if cfg.rule == "trimmed_mean":
        return fl.aggregate_trimmed_avg(results, cfg.beta)
    if cfg.rule == "krum":
        return fl.aggregate_krum(results, cfg.krum_f, to_keep=cfg.krum_to_keep(len(results)))
    raise ValueError(f"robust_arrays: no array rule {cfg.rule!r}")


def robust_blocks(cfg: AggregationParams, state: dict[str, torch.Tensor],
                  replies: list[Message]) -> dict[str, torch.Tensor]:
    """The robust counterpart of mean_per_key: per block, the next value from the clients'
    values (`state` holds the current global blocks)."""
    if cfg.rule == "clipped_mean":
        clipped = []
        for r in replies:
            delta = {k: r.tensors[k] - state[k] for k in r.tensors}
            c = clip(list(delta.values()), cfg.tau)
            clipped.append(Message({k: state[k] + c * d for k, d in delta.items()}, r.meta))
        return mean_per_key(clipped)
    if cfg.rule == "krum":  # whole updates: a block a client did not send is the global one
        keys = sorted({k for r in replies for k in r.tensors})
        results = [([r.tensors.get(k, state[k]).float().numpy() for k in keys], int(r.meta["num_samples"]))
                   for r in replies]
        chosen = robust_arrays(cfg, results)
        return {k: torch.from_numpy(np.asarray(a)).to(state[k].dtype) for k, a in zip(keys, chosen)}
    out = {}
    for key in sorted({k for r in replies for k in r.tensors}):
        senders = [r for r in replies if key in r.tensors]
        folded = robust_arrays(cfg, [([r.tensors[key].float().numpy()], int(r.meta["num_samples"]))
                                     for r in senders])
        out[key] = torch.from_numpy(np.asarray(folded[0])).to(senders[0].tensors[key].dtype)
    return out


MIN_VOTES = 3  # per-seed median: of one or two votes it is one client's choice


def robust_scalars(cfg: AggregationParams, vectors: torch.Tensor, weights: list[float],
                   drawn: torch.Tensor) -> torch.Tensor:
    """Fold clients' scalar vectors (one row per client, one column per shared seed) into one;
    `weights` are the clients' sample shares, `drawn` (same shape, bool) marks the seeds each
    client drew."""
    if cfg.rule == "clipped_mean":
        return sum(v * (clip(v, cfg.tau) * w) for v, w in zip(vectors, weights))
    if cfg.rule == "krum":
        folded = robust_arrays(cfg, [([v.numpy()], 1) for v in vectors])
        return torch.from_numpy(np.asarray(folded[0], dtype=np.float32))
    share = torch.tensor(weights, dtype=torch.float32)
    cut = int(cfg.beta * len(vectors))  # trimmed mean: the round's Byzantine budget, cut per side of any seed
    out = torch.zeros(vectors.shape[1])
    for seed in torch.nonzero(drawn.sum(0) >= MIN_VOTES).flatten().tolist():  # median / trimmed mean over drawers
        voters = drawn[:, seed]
        values = [([np.asarray([v], dtype=np.float32)], 1) for v in vectors[voters, seed].tolist()]
        if cfg.rule == "trimmed_mean" and 2 * cut < len(values):
            rule = cfg.model_copy(update={"beta": cut / len(values)})
        else:  # a median, or a trimmed mean that would cut every vote: the median of the votes
            rule = cfg.model_copy(update={"rule": "median"})
        out[seed] = float(robust_arrays(rule, values)[0][0]) * share[voters].sum()
    return out
