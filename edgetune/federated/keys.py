"""Keyed seeds for seed-scalar federations: the survey's open problem that an intercepted
seed-scalar dictionary plus the public base model is a complete recipe for the fine-tuned model
(Dong et al. 2024, arXiv 2408.10691, Sec. VI).

With a federation key, the perturbation z of public seed s is drawn from
HMAC-SHA256(key, s) (RFC 2104) instead of from s: the messages are unchanged, every party that
holds the key replays them bit-identically, and a replay without the key moves the weights in
directions unrelated to the fine-tuning (tests/test_keyed_seeds.py measures it).

The key never enters params, MLflow or logs: `finetune.zo.secret` names where it is, either
`file:PATH` (its bytes) or `env:NAME` (an environment variable), at least 16 bytes (128 bits),
e.g. `python -c "import secrets; print(secrets.token_hex(32))" > federation.key`. Every party
reads it from its own copy: distribute it out of band, or over the TLS connection a client
enrolls with (docs/reliability.md).

The same key authenticates the messages (`message_mac`): every broadcast and every reply
carries an HMAC tag over its round and content, so a party rejects a tampered, truncated or
replayed dictionary. One federation key means any key holder can sign for any client: it keeps
outsiders out, not one client from speaking for another (that needs per-client keys).
Hand-written: a few calls to the standard library's hmac.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from functools import lru_cache
from pathlib import Path

MIN_BYTES = 16  # 128 bits
MAC_BYTES = 16  # a message's tag: the first 128 bits of HMAC-SHA256


def read_key(ref: str) -> bytes:
    """The key bytes `ref` ('file:PATH' or 'env:NAME') points to; ValueError naming what is wrong
    (params validation turns it into exit 2), never the key itself."""
    if ref.startswith("file:"):
        path = Path(ref[len("file:"):]).expanduser()
        try:
            key = path.read_bytes().strip()
        except OSError as e:
            raise ValueError(f"key file {str(path)!r}: cannot read it ({e.strerror or e.__class__.__name__})") from None
        where = f"key file {str(path)!r}"
    elif ref.startswith("env:"):
        name = ref[len("env:"):]
        if not os.environ.get(name):
            raise ValueError(f"environment variable {name!r} is not set (it should hold the federation key)")
        key, where = os.environ[name].strip().encode(), f"environment variable {name!r}"
    else:
        raise ValueError(f"{ref!r}: expected 'file:PATH' or 'env:NAME' (the key itself never goes in params)")
    if len(key) < MIN_BYTES:
        raise ValueError(f"{where} holds {len(key) * 8} bits; a federation key needs at least {MIN_BYTES * 8}")
    return key


def fingerprint(key: bytes) -> str:
    """8 hex digits that tell two keys apart without revealing either (recorded with the pairs,
    so a party holding another key stops instead of replaying into other weights)."""
    return hmac.new(key, b"edgetune federation key fingerprint", hashlib.sha256).hexdigest()[:8]


@lru_cache(maxsize=1 << 16)
def keyed_seed(key: bytes, seed: int) -> int:
    """The seed z is actually drawn from: the first 63 bits of HMAC-SHA256(key, seed)."""
    digest = hmac.new(key, (int(seed) & (1 << 64) - 1).to_bytes(8, "big"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def message_mac(key: bytes, round_: int, tensors: dict, meta: dict) -> str:
    """The tag that authenticates one seed-scalar message of round `round_`: HMAC-SHA256 under
    the federation key over the round, the meta (without its tag) and every tensor's name, dtype,
    shape and bytes, cut to MAC_BYTES and written in hex. A message altered, cut short or
    resent in another round no longer matches its tag."""
    import torch

    mac = hmac.new(key, b"edgetune message %d " % int(round_), hashlib.sha256)
    mac.update(json.dumps({k: v for k, v in meta.items() if k != "mac"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        mac.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # an empty tensor has no bytes (and, from Flower's numpy, a 0 stride)
            mac.update(t.clone().reshape(-1).view(torch.uint8).numpy().tobytes())
    return mac.hexdigest()[:2 * MAC_BYTES]


def mac_problem(key: bytes, round_: int, tensors: dict, meta: dict) -> str | None:
    """Why a message's tag does not authenticate it for `round_` (None: it does)."""
    tag = meta.get("mac")
    if not isinstance(tag, str):
        return "no MAC (the federation signs every seed-scalar message)"
    if not hmac.compare_digest(tag, message_mac(key, round_, tensors, meta)):
        return f"MAC does not match for round {round_} (altered, cut short, or replayed from another round)"
    return None
