"""Zeroth-order SGD with regenerated perturbations: MeZO (Malladi et al., NeurIPS 2023).

Written by hand: no maintained library implements it. The seed -> z contract, which every
seed-scalar method (JOB, FedKSeed, FwdLLM) relies on:

    z(seed) is a vector over the trainable parameters, in their fixed order, drawn by a
    `Sampler` (finetune.zo.generator x finetune.zo.distribution). It is never stored: every
    use regenerates it, so perturbing costs no memory beyond one chunk per thread.
      torch-cpu (the default, the contract before versioning): cut into chunks of at most
        CHUNK elements, chunk i drawn from torch.Generator().manual_seed(chunk_seed(seed, i));
        gaussian = torch.randn, rademacher = torch.randint bytes, one bit per weight. CPU only
        (a CUDA client draws on the CPU and copies each chunk over).
      philox: element j of z is a pure function of (seed, j) (federated/philox.py): the same
        bits on every device, for any chunking and thread count.
    Which sampler made a seed travels with it: Sampler.tag in checkpoints and, when it is not
    the default, in every seed-scalar message (methods/seed_scalar.py); no tag = torch-cpu/gaussian.
    With finetune.zo.sparsity > 0 (Sparse MeZO, `SparseMask`), z is zero outside a fixed mask
    of each weight matrix's smallest-magnitude entries, and the tag says so ("+sparse0.75").

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
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import torch

from edgetune.federated import keys, philox

CHUNK = 1 << 20  # 1M elements (4 MB of float32) of z alive per thread
DEVICE_CHUNK = 1 << 23  # philox off the CPU: fewer, larger kernel launches (the Gaussian
#                         intermediates of a chunk: ~200 MB on the device)
MASK64 = (1 << 64) - 1


def trainable(model) -> list[torch.nn.Parameter]:
    """The parameters a ZO method perturbs: those with requires_grad, in model order."""
    return [p for p in model.parameters() if p.requires_grad]


Chunk = tuple[int, list[torch.Tensor]]  # (offset in z of its first element, flat weight views)


def chunks(params: Sequence[torch.Tensor], size: int | None = None, pack: bool = False) -> list[Chunk]:
    """The trainable weights as chunks of at most `size` (default CHUNK) elements of z, each
    (offset of its first element in z, its flat views). pack=False: one view per chunk, every
    tensor cut on its own (the torch-cpu contract). pack=True: z's elements [k size, (k+1) size)
    in one chunk across tensors of one dtype (philox: one draw for many small tensors; a
    model's norms and biases cost ~200 tensor ops each drawn alone)."""
    size = size or CHUNK
    out: list[Chunk] = []
    offset = 0
    for p in params:
        flat, start = p.data.view(-1), 0
        while start < p.numel():
            first = offset + start
            end = min(p.numel(), start + size, ((first // size + 1) * size - offset) if pack else p.numel())
            last = out[-1] if out else None
            if pack and last and last[0] // size == first // size and last[1][0].dtype == p.dtype:
                last[1].append(flat[start:end])
            else:
                out.append((first, [flat[start:end]]))
            start = end
        offset += p.numel()
    return out


def chunks_for(params: Sequence[torch.Tensor], sampler) -> list[Chunk]:
    """The chunks `sampler` draws z in: torch-cpu, CHUNK elements per tensor piece; philox,
    packed windows of CHUNK elements (DEVICE_CHUNK off the CPU: its numbers do not depend on
    the chunking)."""
    if sampler.generator != "philox":
        return chunks(params, CHUNK)
    on_cpu = not params or params[0].device.type == "cpu"
    return chunks(params, CHUNK if on_cpu else DEVICE_CHUNK, pack=True)


def chunk_seed(seed: int, index: int) -> int:
    """The generator seed of chunk `index` of z(seed): splitmix64 of (seed, index), so chunks
    are independent streams that threads can draw in parallel."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + index + 1) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


GENERATORS = ("torch-cpu", "philox")  # finetune.zo.generator
DISTRIBUTIONS = ("gaussian", "rademacher")  # finetune.zo.distribution
CONTRACT = 1  # bump when any sampler's seed -> z mapping changes


class SparseMask:
    """Sparse MeZO (Liu et al., ICML 2024, arXiv 2402.15751): ZO noise hurts most when added to
    large weights, so z is kept only on each weight matrix's entries with |w| <= h, h the
    tensor's `1 - sparsity` quantile of |w|; vectors (norm gains, biases) keep their full z.

    The mask is fixed from the weights it is built on: the initial (round-0) weights, which
    every party holds before it replays anything, so all of them restrict z identically and
    replays stay bit-exact. Written by hand (no library has it). It is kept as one bool per
    masked weight (+25% of float32 weights' memory); the paper recomputes it on the fly from
    the current weights instead, which would let the +eps / -eps passes of one step disagree
    on entries near h."""

    def __init__(self, params: Sequence[torch.Tensor], sparsity: float):
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        self.sparsity = sparsity
        self.masks = [(p, self.small_entries(p.data, sparsity) if p.dim() >= 2 else None) for p in params]
        self.by_storage: dict[int, tuple[int, torch.Tensor | None]] = {}

    @staticmethod
    @torch.no_grad()
    def small_entries(w: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Flat bool mask of the `1 - sparsity` share of w's entries with the smallest |w|."""
        mags = w.detach().reshape(-1).abs()
        keep = max(1, round((1.0 - sparsity) * mags.numel()))
        return mags <= mags.float().kthvalue(keep).values.to(mags.dtype)

    def locate(self, view: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(storage offset, mask) of the parameter `view` slices. Looked up by storage, and
        re-indexed when a storage is unknown: the parameters moved since (model.to(device) in
        federated/setup.py gives them new storage), and the masks move with them."""
        ptr = view.untyped_storage().data_ptr()
        if ptr not in self.by_storage:
            self.masks = [(p, m if m is None else m.to(p.device)) for p, m in self.masks]
            self.by_storage = {p.untyped_storage().data_ptr(): (p.storage_offset(), m) for p, m in self.masks}
        if ptr not in self.by_storage:
            raise RuntimeError("SparseMask: z drawn for a tensor that is not one of the masked parameters")
        return self.by_storage[ptr]

    def restrict(self, view: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """z (a segment for the flat weight slice `view`) zeroed outside the mask, in place."""
        offset, mask = self.locate(view)
        if mask is None:  # a vector: its full z
            return z
        start = view.storage_offset() - offset
        return z.mul_(mask[start:start + view.numel()])


@dataclass(frozen=True)
class Sampler:
    """Which z a seed means. Rademacher (+1 / -1, Spall's SPSA) makes theta + scale z exact in
    the multiplication, so replays round identically on every device (with philox). With a
    federation `key` (keys.py), z of seed s is drawn from HMAC(key, s) instead."""

    generator: str = "torch-cpu"
    distribution: str = "gaussian"
    key: bytes | None = field(default=None, repr=False)
    mask: SparseMask | None = field(default=None, repr=False, compare=False)
    sparsity: float = field(init=False, default=0.0)

    def __post_init__(self):
        if self.generator not in GENERATORS or self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown sampler {self.generator}/{self.distribution}")
        object.__setattr__(self, "sparsity", self.mask.sparsity if self.mask else 0.0)

    @property
    def tag(self) -> str:
        """What checkpoints and messages record, e.g. 'philox/rademacher@1', with the key's
        fingerprint when keyed ('torch-cpu/gaussian@1+key:1f0c9a2e')."""
        keyed = f"+key:{keys.fingerprint(self.key)}" if self.key else ""
        sparse = f"+sparse{self.sparsity:g}" if self.sparsity else ""
        return f"{self.generator}/{self.distribution}@{CONTRACT}{keyed}{sparse}"

    def draw(self, seed: int, index: int, chunk: Chunk) -> torch.Tensor:
        """Chunk number `index` of z(seed) (chunks_for), flat, in its views' dtype and device."""
        if self.key:
            seed = keys.keyed_seed(self.key, seed)
        offset, views = chunk
        n, like = sum(v.numel() for v in views), views[0]
        if self.generator == "philox":
            draw = philox.DISTRIBUTIONS[self.distribution]
            return draw(seed, offset, n, like.device, like.dtype, out=z_buffer(n, like, philox.SLACK))
        gen = torch.Generator().manual_seed(chunk_seed(seed, index))
        if self.distribution == "gaussian":
            z = torch.randn(n, generator=gen, dtype=like.dtype, out=z_buffer(n, like))
        else:
            data = torch.randint(0, 256, (-(-n // 8),), dtype=torch.uint8, generator=gen)
            z = philox.signs_of_bytes(data, like.dtype, out=z_buffer(n, like, philox.SLACK))[:n]
        return z if like.device.type == "cpu" else z.to(like.device)

    def draw_masked(self, seed: int, index: int, chunk: Chunk) -> torch.Tensor:
        """`draw`, zeroed outside the Sparse MeZO mask (when there is one): what is added."""
        z = self.draw(seed, index, chunk)
        if self.mask:
            start = 0
            for view in chunk[1]:
                self.mask.restrict(view, z[start:start + view.numel()])
                start += view.numel()
        return z


LEGACY = Sampler()  # the stream of every run before samplers were versioned


_local = threading.local()


def z_buffer(n: int, like: torch.Tensor, slack: int = 0) -> torch.Tensor | None:
    """This thread's reusable buffer for n elements of z (and `slack` more) in like's dtype,
    None off the CPU. Drawing into it allocates nothing: with a fresh 16 MB tensor per chunk,
    the allocator kept freed blocks per thread and a MeZO step peaked ~10% above inference
    (benchmarks/memory.py); with 4 MB buffers it is ~2%."""
    if like.device.type != "cpu":
        return None
    buf = getattr(_local, "buf", None)
    if buf is None or buf.dtype != like.dtype or len(buf) < n + slack:
        buf = _local.buf = torch.empty(max(CHUNK, n) + philox.SLACK, dtype=like.dtype)
    return buf[:n + slack]


@torch.no_grad()
def perturb(params: Sequence[torch.Tensor], seed: int, scale: float, sampler: Sampler = LEGACY) -> None:
    """theta <- theta + scale * z(seed), in place, regenerating z chunk by chunk (on a CPU in
    parallel threads: torch releases the GIL, and drawing z is most of a ZO step's overhead)."""
    parts = chunks_for(params, sampler)

    def add(i: int) -> None:
        z, start = sampler.draw_masked(seed, i, parts[i]), 0
        for view in parts[i][1]:
            view.add_(z[start:start + view.numel()], alpha=scale)
            start += view.numel()

    if len(parts) == 1 or parts[0][1][0].device.type != "cpu":
        for i in range(len(parts)):
            add(i)
    else:
        list(_pool().map(add, range(len(parts))))


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))


@torch.no_grad()
def materialize(params: Sequence[torch.Tensor], seed: int, sampler: Sampler = LEGACY) -> torch.Tensor:
    """z(seed) as one flat vector, drawn exactly as `perturb` draws it (for small trainable
    sets only, e.g. LoRA: FwdLLM compares candidate perturbations by cosine similarity)."""
    return torch.cat([sampler.draw_masked(seed, i, chunk).clone()
                      for i, chunk in enumerate(chunks_for(params, sampler))])


@torch.no_grad()
def projected_gradient(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], seed: int,
                       eps: float, sampler: Sampler = LEGACY) -> tuple[float, float]:
    """(g, mean loss) from two forward passes at theta +/- eps z(seed); theta is restored."""
    perturb(params, seed, eps, sampler)
    loss_plus = float(loss_fn())
    perturb(params, seed, -2 * eps, sampler)
    loss_minus = float(loss_fn())
    perturb(params, seed, eps, sampler)
    return (loss_plus - loss_minus) / (2 * eps), (loss_plus + loss_minus) / 2


@torch.no_grad()
def step(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], seed: int, eps: float,
         lr: float, sampler: Sampler = LEGACY) -> tuple[float, float]:
    """One MeZO step in three passes over the weights instead of four: the restoring +eps
    pass and the update are fused (theta += (eps - lr g) z). Returns (g, mean loss)."""
    perturb(params, seed, eps, sampler)
    loss_plus = float(loss_fn())
    perturb(params, seed, -2 * eps, sampler)
    loss_minus = float(loss_fn())
    grad = (loss_plus - loss_minus) / (2 * eps)
    perturb(params, seed, eps - lr * grad, sampler)
    return grad, (loss_plus + loss_minus) / 2


@torch.no_grad()
def decay(params: Sequence[torch.Tensor], lr: float, weight_decay: float) -> None:
    """theta <- (1 - lr * wd) * theta (decoupled weight decay, as in MeZO's trainer)."""
    if weight_decay:
        for p in params:
            p.data.mul_(1 - lr * weight_decay)


@torch.no_grad()
def apply_update(params: Sequence[torch.Tensor], seed: int, grad: float, lr: float,
                 weight_decay: float = 0.0, sampler: Sampler = LEGACY) -> None:
    """theta <- (1 - lr * wd) * theta - lr * g * z(seed)."""
    decay(params, lr, weight_decay)
    perturb(params, seed, -lr * grad, sampler)


@torch.no_grad()
def replay(params: Sequence[torch.Tensor], seeds: Sequence[int], grads: Sequence[float],
           lr: float, weight_decay: float = 0.0, sampler: Sampler = LEGACY) -> None:
    """Apply a seed-scalar dictionary in order: how any party rebuilds the global model.
    Same start, same pairs, same order -> bit-identical weights in any process (philox +
    rademacher: on any device too)."""
    for seed, grad in zip(seeds, grads):
        if grad != 0.0:
            apply_update(params, int(seed), float(grad), lr, weight_decay, sampler)


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
