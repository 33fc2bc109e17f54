"""Helper run in a fresh process by test_meft: rebuild the global model from the exchanged
dictionary alone (base weights + checkpointed seed-scalar history) and print its hash."""

import hashlib
import json
import sys
from pathlib import Path

import torch

from edgetune.config import FinetuneParams
from edgetune.federated.methods import build_method
from edgetune.federated.protocol import from_bytes
from edgetune.models import load_hf
from edgetune.tasks import get_task


def weights_hash(params) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    model_dir, cfg_json, checkpoint = sys.argv[1:4]
    cfg = FinetuneParams.model_validate(json.loads(cfg_json))
    torch.manual_seed(cfg.seed)
    model, tok = load_hf(model_dir)
    method = build_method(cfg, tok, get_task("sst2"))
    model = method.prepare_model(model)
    method.rebuild(model, from_bytes(Path(checkpoint).read_bytes()).tensors)
    print(weights_hash(method.params))
