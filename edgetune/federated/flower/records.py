"""edgetune's messages as Flower records, and their size on Flower's wire.

An edgetune Message (protocol.py: named tensors + scalar meta) travels as a Flower RecordDict
with an ArrayRecord of the tensors (each a numpy Array, bytes exact, dtype and shape kept) and
a ConfigRecord of the meta. Flower splits arrays into chunks and sends every object of the tree
by content hash; `wire_size` adds up those objects' serialized bytes, the payload a SuperNode
pulls or pushes for the message (HTTP framing aside).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from edgetune.federated.protocol import Message

TENSORS, META = "tensors", "meta"


def to_records(msg: Message, **extra: ConfigRecord | ArrayRecord) -> RecordDict:
    """The message's tensors and meta as records (plus any `extra` records, e.g. a job spec)."""
    arrays = ArrayRecord({k: Array(v.detach().contiguous().cpu().numpy()) for k, v in msg.tensors.items()})
    return RecordDict({TENSORS: arrays, META: ConfigRecord(dict(msg.meta)), **extra})


def from_records(content: RecordDict) -> Message:
    tensors = {k: torch.from_numpy(np.array(a.numpy())) for k, a in content[TENSORS].items()}
    return Message(tensors, dict(content[META]))


def put(target, prefix: str, msg: Message) -> None:
    """Store `msg` in a RecordDict (or dict of records) as <prefix>/tensors and <prefix>/meta."""
    rd = to_records(msg)
    target[f"{prefix}/{TENSORS}"], target[f"{prefix}/{META}"] = rd[TENSORS], rd[META]


def take(source, prefix: str) -> Message:
    """The message `put` stored under `prefix`."""
    return from_records(RecordDict({TENSORS: source[f"{prefix}/{TENSORS}"], META: source[f"{prefix}/{META}"]}))


def versions(source, head: str) -> list[int]:
    """The numbers v of every <head>/<v>/... record in `source`, sorted."""
    return sorted({int(k.split("/")[1]) for k in source if k.startswith(f"{head}/")})


def wire_size(obj) -> int:
    """Bytes of every object Flower sends for `obj` (a Message or a record), chunks deduplicated
    as Flower does."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())
