"""Zeroth-order SGD with regenerated perturbations: MeZO (Malladi et al., NeurIPS 2023).

Written by hand: no maintained library implements it. The seed -> z contract, which every
seed-scalar method (JOB, FedKSeed, FwdLLM) relies on:

    z(seed) is a standard normal vector over the trainable parameters, cut in their fixed order
    into chunks of at most CHUNK elements; chunk i is drawn from
    torch.Generator().manual_seed(chunk_seed(seed, i)). It is never stored: every use
    regenerates it, so perturbing costs no memory beyond one chunk per thread.

One step: perturb +eps, loss L+; perturb -2 eps, loss L-; perturb +eps (restores theta up to
float rounding); projected gradient g = (L+ - L-) / (2 eps); update theta <- theta - lr * g * z.
`step` fuses the last two passes. Replaying a dictionary (`replay`) always uses the unfused
update, so every party rebuilds the same bits.
No backward pass and no activations kept: peak memory stays at inference level.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Sequence

import torch

CHUNK = 1 << 20  # 1M elements (4 MB of float32) of z alive per thread
MASK64 = (1 << 64) - 1


def trainable(model) -> list[torch.nn.Parameter]:
    """The parameters a ZO method perturbs: those with requires_grad, in model order."""
    return [p for p in model.parameters() if p.requires_grad]


def chunks(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Flat views of the trainable weights, cut into pieces of at most CHUNK elements."""
    return [p.data.view(-1)[start:start + CHUNK]
            for p in params for start in range(0, p.numel(), CHUNK)]


def chunk_seed(seed: int, index: int) -> int:
    """The generator seed of chunk `index` of z(seed): splitmix64 of (seed, index), so chunks
    are independent streams that threads can draw in parallel."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + index + 1) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def chunk_z(seed: int, index: int, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(chunk_seed(seed, index))
    return torch.randn(like.numel(), generator=gen, dtype=like.dtype, out=out)


_local = threading.local()


def z_buffer(like: torch.Tensor) -> torch.Tensor:
    """This thread's reusable buffer for one chunk of z. Drawing into it allocates nothing:
    with a fresh 16 MB tensor per chunk, the allocator kept freed blocks per thread and a MeZO
    step peaked ~10% above inference (benchmarks/memory.py); with 4 MB buffers it is ~2%."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.dtype != like.dtype:
        buf = _local.buf = torch.empty(CHUNK, dtype=like.dtype)
    return buf[:like.numel()]


@torch.no_grad()
def perturb(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """theta <- theta + scale * z(seed), in place, regenerating z chunk by chunk (in parallel
    threads: torch releases the GIL, and drawing z is most of a ZO step's overhead on a CPU)."""
    parts = chunks(params)

    def add(i: int) -> None:
        parts[i].add_(chunk_z(seed, i, parts[i], out=z_buffer(parts[i])), alpha=scale)

    if len(parts) == 1:
        add(0)
    else:
        list(_pool().map(add, range(len(parts))))


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))


@torch.no_grad()
def materialize(params: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    """z(seed) as one flat vector, drawn exactly as `perturb` draws it (for small trainable
    sets only, e.g. LoRA: FwdLLM compares candidate perturbations by cosine similarity)."""
    return torch.cat([chunk_z(seed, i, part) for i, part in enumerate(chunks(params))])


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
def step(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], seed: int, eps: float,
         lr: float) -> tuple[float, float]:
    """One MeZO step in three passes over the weights instead of four: the restoring +eps
    pass and the update are fused (theta += (eps - lr g) z). Returns (g, mean loss)."""
    perturb(params, seed, eps)
    loss_plus = float(loss_fn())
    perturb(params, seed, -2 * eps)
    loss_minus = float(loss_fn())
    grad = (loss_plus - loss_minus) / (2 * eps)
    perturb(params, seed, eps - lr * grad)
    return grad, (loss_plus + loss_minus) / 2


@torch.no_grad()
def decay(params: Sequence[torch.Tensor], lr: float, weight_decay: float) -> None:
    """theta <- (1 - lr * wd) * theta (decoupled weight decay, as in MeZO's trainer)."""
    if weight_decay:
        for p in params:
            p.data.mul_(1 - lr * weight_decay)


@torch.no_grad()
def apply_update(params: Sequence[torch.Tensor], seed: int, grad: float, lr: float,
                 weight_decay: float = 0.0) -> None:
    """theta <- (1 - lr * wd) * theta - lr * g * z(seed)."""
    decay(params, lr, weight_decay)
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


@contextmanager
def restored(params: Sequence[torch.Tensor]):
    """Run the body, then put params back as they were, also when the body raises (a failed
    client must leave the shared model at the global weights for the next one)."""
    saved = snapshot(params)
    try:
        yield
    finally:
        restore(params, saved)
