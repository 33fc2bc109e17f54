"""Helper run in a fresh process by test_meft: rebuild the global model from the exchanged
dictionary alone (base weights + checkpointed seed-scalar history) and print its hash."""

import hashlib
import json
import sys
from pathlib import Path

from edgetune.config import FinetuneParams
from edgetune.federated.protocol import from_bytes
from tests.helpers import build


def weights_hash(params) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    model_dir, cfg_json, checkpoint = sys.argv[1:4]
    cfg = FinetuneParams.model_validate(json.loads(cfg_json))
    method, model = build(model_dir, cfg)
    method.rebuild(model, from_bytes(Path(checkpoint).read_bytes()).tensors)
    print(weights_hash(method.params))
