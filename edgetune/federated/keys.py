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
enrolls with (docs/reliability.md). Hand-written: two calls to the standard library's hmac.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from functools import lru_cache
from pathlib import Path

MIN_BYTES = 16  # 128 bits


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
