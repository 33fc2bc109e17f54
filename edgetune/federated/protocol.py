"""The messages a client and the server exchange, and their exact size on the wire.

A message is a dict of tensors plus a few JSON-able scalars (sample count, loss), serialized
with safetensors: the bytes metered are the bytes of that real serialization, header included.
The engine passes every message through `to_bytes` / `from_bytes`, so a client only ever sees
what the server sent and the server only what clients sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


@dataclass
class Message:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, float | int | str] = field(default_factory=dict)


def to_bytes(msg: Message) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in msg.tensors.items()}
    return st_save(tensors, metadata={"meta": json.dumps(msg.meta, sort_keys=True)})


def from_bytes(data: bytes) -> Message:
    tensors = st_load(data)
    # safetensors keeps the metadata in its JSON header; read it back from there.
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    return Message(tensors=tensors, meta=meta)
