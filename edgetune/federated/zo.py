"""Zeroth-order SGD with regenerated perturbations: MeZO (Malladi et al., NeurIPS 2023).

Written by hand: no maintained library implements it. The seed -> z contract, which every
seed-scalar method (JOB, FedKSeed, FwdLLM) relies on:

    z(seed) is a standard normal vector over the trainable parameters, drawn in their fixed order,
    in chunks of CHUNK elements, from torch.Generator().manual_seed(seed). It is never stored:
    every use regenerates it, so perturbing costs no memory beyond one chunk.

One step: perturb +eps, loss L+; perturb -2 eps, loss L-; perturb +eps (restores theta up to
float rounding); projected gradient g = (L+ - L-) / (2 eps); update theta <- theta - lr * g * z.
No backward pass and no activations kept: peak memory stays at inference level.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

CHUNK = 1 << 22  # 4M elements (16 MB of float32) of z alive at a time


def trainable(model) -> list[torch.nn.Parameter]:
    """The parameters a ZO method perturbs: those with requires_grad, in model order."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def perturb(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """theta <- theta + scale * z(seed), in place, regenerating z chunk by chunk."""
    gen = torch.Generator().manual_seed(int(seed))
    for p in params:
        flat = p.data.view(-1)
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start:start + CHUNK]
            part.add_(torch.randn(part.numel(), generator=gen, dtype=p.dtype), alpha=scale)


@torch.no_grad()
def materialize(params: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    """z(seed) as one flat vector, drawn exactly as `perturb` draws it (for small trainable
    sets only, e.g. LoRA: FwdLLM compares candidate perturbations by cosine similarity)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.cat([torch.randn(min(CHUNK, p.numel() - start), generator=gen, dtype=p.dtype)
                      for p in params for start in range(0, p.numel(), CHUNK)])


@torch.no_grad()
def projected_gradient(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], seed: int,
                       eps: float) -> tuple[float, float]:
    """(g, mean loss) from two forward passes at theta +/- eps z(seed); theta is restored."""
    perturb(params, seed, eps)
    loss_plus = float(loss_fn())
    perturb(params, seed, -2 * eps)
    loss_minus = float(loss_fn())
    perturb(params, seed, eps)
    return (loss_plus - loss_minus) / (2 * eps), (loss_plus + loss_minus) / 2


@torch.no_grad()
def apply_update(params: Sequence[torch.Tensor], seed: int, grad: float, lr: float,
                 weight_decay: float = 0.0) -> None:
    """theta <- theta - lr * (g * z(seed) + wd * theta)."""
    if weight_decay:
        for p in params:
            p.data.mul_(1 - lr * weight_decay)
    perturb(params, seed, -lr * grad)


@torch.no_grad()
def replay(params: Sequence[torch.Tensor], seeds: Sequence[int], grads: Sequence[float],
           lr: float, weight_decay: float = 0.0) -> None:
    """Apply a seed-scalar dictionary in order: how any party rebuilds the global model.
    Same start, same pairs, same order -> bit-identical weights in any process."""
    for seed, grad in zip(seeds, grads):
        if grad != 0.0:
            apply_update(params, int(seed), float(grad), lr, weight_decay)


@torch.no_grad()
def snapshot(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    for p, s in zip(params, saved):
        p.data.copy_(s)
