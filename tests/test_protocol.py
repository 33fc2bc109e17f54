"""Messages survive the wire and their metered size is the real serialized size."""

import torch

from edgetune.federated.protocol import Message, from_bytes, to_bytes


def test_roundtrip_keeps_tensors_dtypes_and_meta():
    msg = Message({"a": torch.randn(3, 4), "seeds": torch.arange(5, dtype=torch.int64)},
                  {"num_samples": 12, "loss": 0.25})
    back = from_bytes(to_bytes(msg))
    assert back.meta == {"num_samples": 12, "loss": 0.25}
    assert torch.equal(back.tensors["a"], msg.tensors["a"])
    assert back.tensors["seeds"].dtype == torch.int64


def test_size_is_payload_plus_a_small_header():
    small = len(to_bytes(Message({"w": torch.zeros(10)})))
    large = len(to_bytes(Message({"w": torch.zeros(1010)})))
    # float32 payload; the JSON header only grows by a few digits and 8-byte alignment
    assert 1000 * 4 <= large - small <= 1000 * 4 + 16
    assert small < 200
