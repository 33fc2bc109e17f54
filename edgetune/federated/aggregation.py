"""Byzantine-robust aggregation of the clients' replies (finetune.aggregation).

    mean          each method's own sample-weighted mean (FedAvg); never routed through here
    median        per coordinate median over clients                (flwr aggregate_median)
    trimmed_mean  per coordinate mean after cutting beta per side   (flwr aggregate_trimmed_avg)
    krum          the reply with the least summed squared distance to its n-f-2 nearest
                  others (Blanchard et al., NeurIPS 2017)           (flwr aggregate_krum)
    clipped_mean  each client's update clipped to norm tau, then the sample-weighted mean
                  (written by hand: flwr has no clipping aggregate; the mean is flwr's aggregate)

Weight messages (`robust_blocks`): the coordinate rules run block by block over the clients that
sent the block; Krum and clipping see a client's whole update (all the blocks it sent; a block it
did not send counts as no change). Median, trimmed mean and Krum ignore sample counts.

Seed-scalar messages (`robust_scalars`): one vector per client, its scalars indexed by seeds the
clients share (FedKSeed's K candidates; a candidate a client did not draw is 0), folded by the
same rules. Clients that never share a seed (JOB, FwdLLM) admit only clipping (`clip`): their
vectors have no common coordinates to take a median of or to measure distances on.
"""

from __future__ import annotations

import numpy as np
import torch

from edgetune.config import AggregationParams
from edgetune.federated.protocol import Message


def clip(update: torch.Tensor | list[torch.Tensor], tau: float) -> float:
    """The factor min(1, tau / ||update||) that brings an update (one tensor or several,
    one norm over all) to norm at most tau."""
    parts = update if isinstance(update, list) else [update]
    norm = float(torch.sqrt(sum(p.double().pow(2).sum() for p in parts)))
    return min(1.0, tau / norm) if norm > 0 else 1.0


def robust_arrays(cfg: AggregationParams, results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Fold clients' (arrays, num_samples) by a robust rule other than clipped_mean."""
    from flwr.server.strategy import aggregate as fl

    if cfg.rule == "median":
        return fl.aggregate_median(results)
    if cfg.rule == "trimmed_mean":
        return fl.aggregate_trimmed_avg(results, cfg.beta)
    if cfg.rule == "krum":
        return fl.aggregate_krum(results, cfg.krum_f, to_keep=0)
    raise ValueError(f"robust_arrays: no array rule {cfg.rule!r}")


def robust_blocks(cfg: AggregationParams, state: dict[str, torch.Tensor],
                  replies: list[Message]) -> dict[str, torch.Tensor]:
    """The robust counterpart of weights.mean_per_key: per block, the next value from the
    clients' values (`state` holds the current global blocks)."""
    from edgetune.federated.methods.weights import mean_per_key

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
        winner = next(r for r, (arrays, _) in zip(replies, results) if arrays is chosen)
        return {k: winner.tensors[k].clone() for k in winner.tensors}
    out = {}
    for key in sorted({k for r in replies for k in r.tensors}):
        senders = [r for r in replies if key in r.tensors]
        folded = robust_arrays(cfg, [([r.tensors[key].float().numpy()], int(r.meta["num_samples"]))
                                     for r in senders])
        out[key] = torch.from_numpy(np.asarray(folded[0])).to(senders[0].tensors[key].dtype)
    return out


def robust_scalars(cfg: AggregationParams, vectors: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Fold clients' scalar vectors (one row per client, one column per shared seed) into one;
    `weights` are the clients' sample shares (used by clipped_mean)."""
    if cfg.rule == "clipped_mean":
        return sum(v * (clip(v, cfg.tau) * w) for v, w in zip(vectors, weights))
    folded = robust_arrays(cfg, [([v.numpy()], 1) for v in vectors])
    return torch.from_numpy(np.asarray(folded[0], dtype=np.float32))
