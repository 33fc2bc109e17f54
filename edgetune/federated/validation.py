"""Malformed replies never reach aggregation: the server checks every reply against what the
method's clients send (tensor names, shapes, dtypes, finite values, a valid sample count and
loss, method-specific values such as FedKSeed's seed indices) and drops one that fails, with
the client and the reason logged; the round goes on with the others (engine.py).

Robust rules (aggregation.py) bound the damage of well-formed but hostile updates; this module
stops the ones that would crash the server or put NaN into the global model. Written by hand:
Flower and safetensors check the encoding, not what a method expects inside it.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from edgetune.federated.protocol import Message

# name -> (shape, dtype); shape None = any 1-D tensor of at most `max_elements` entries,
# dtype None = any floating dtype
Expected = dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]]
MAX_SIDE_ELEMENTS = 1 << 16  # a side tensor (e.g. per-layer scores) is never larger


def meta_problem(reply: Message) -> str | None:
    """A reply's sample count must be a positive integer and its loss a finite number."""
    n, loss = reply.meta.get("num_samples"), reply.meta.get("loss")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"meta num_samples is {n!r}, expected a positive integer"
    if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
        return f"meta loss is {loss!r}, expected a finite number"
    return None


def tensor_problem(name: str, t: torch.Tensor, shape: tuple[int, ...] | None, dtype: torch.dtype | None,
                   max_elements: int) -> str | None:
    if (t.dtype != dtype) if dtype is not None else not t.is_floating_point():
        return f"tensor {name!r} has dtype {t.dtype}, expected {dtype or 'a floating dtype'}"
    if shape is None and (t.dim() != 1 or t.numel() > max_elements):
        return f"tensor {name!r} has shape {tuple(t.shape)}, expected 1-D with at most {max_elements} entries"
    if shape is not None and tuple(t.shape) != tuple(shape):
        return f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return f"tensor {name!r} holds NaN or Inf"
    return None


def reply_problem(reply: Message, expected: Expected, required: Iterable[str] = (),
                  max_elements: int = MAX_SIDE_ELEMENTS) -> str | None:
    """Why `reply` does not match `expected` (None when it does): its meta, then unexpected or
    missing tensors, then each tensor's dtype, shape and values."""
    problem = meta_problem(reply)
    if problem:
        return problem
    unexpected = sorted(set(reply.tensors) - set(expected))
    if unexpected:
        return f"unexpected tensors {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
    missing = sorted(set(required) - set(reply.tensors))
    if missing:
        return f"missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}"
    for name, t in reply.tensors.items():
        problem = tensor_problem(name, t, *expected[name], max_elements)
        if problem:
            return problem
    return None
