"""Helper run in a fresh process by test_meft: rebuild global models from the exchanged
dictionary alone (base weights + checkpointed seed-scalar history) and print their hashes, one
line per case, in one process (one start-up for every case).

    python -m tests.rebuild_from_checkpoint MODEL_DIR CASES_JSON   # [[finetune cfg json, checkpoint], ...]
"""

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


def rebuild_hash(model_dir: str, cfg_json: str, checkpoint: str) -> str:
    cfg = FinetuneParams.model_validate(json.loads(cfg_json))
    method, model = build(model_dir, cfg)
    method.rebuild(model, from_bytes(Path(checkpoint).read_bytes()).tensors)
    return weights_hash(method.params)


if __name__ == "__main__":
    model_dir, cases = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    for cfg_json, checkpoint in cases:
        print(rebuild_hash(model_dir, cfg_json, checkpoint), flush=True)
