"""A Flower run's job: what the ServerApp needs to run the round loop, written by the finetune
stage as JSON and named in the run config (`flwr run ... --run-config 'job="<path>"'`).

Paths are the server machine's: the base model (the server builds the initial state and
exports the final model from it), the output folder, the MLflow store. Clients never read this
file: each message tells its ClientApp the finetune params, and each SuperNode's node config
names its own partitions and model copy (clientapp.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgetune.config import BadInput, FinetuneParams

JOB_ENV = "EDGETUNE_FLOWER_JOB"  # the job's path for a ServerApp in the Simulation Engine


@dataclass
class FlowerJob:
    finetune: dict  # FinetuneParams.model_dump(mode="json")
    task: str
    model: str  # base HF folder on the server
    out: str  # the finetune stage's --out folder
    num_clients: int  # client ids 0..num_clients-1, each owned by one SuperNode
    tracking_uri: str | None = None  # MLflow store the ServerApp logs rounds to
    run_id: str | None = None  # the finetune stage's MLflow run
    connect_timeout: float = 120.0  # seconds to wait for SuperNodes owning every client
    round_timeout: float = 600.0  # seconds a round waits for replies; missing ones are dropped
    extra: dict = field(default_factory=dict)
    resume: list[str] | None = None  # resume.ResumeFolder (folder, fingerprint) the ServerApp goes on from
    runtime: dict | None = None  # ModelParams.model_dump(mode="json"): model.device / dtype; None = CPU float32

    @property
    def model_runtime(self):
        from edgetune.config import ModelParams

        return ModelParams.model_validate(self.runtime) if self.runtime else None

    def resume_folder(self):
        """The stage's resume.ResumeFolder, or None."""
        from edgetune.federated.resume import ResumeFolder

        return ResumeFolder(*self.resume) if self.resume else None

    @property
    def params(self) -> FinetuneParams:
        return FinetuneParams.model_validate(self.finetune)

    def write(self, path: Path) -> Path:
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        return path

    @classmethod
    def read(cls, path: str | Path) -> "FlowerJob":
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"run config 'job': {path} is not a file (written by the finetune stage)")
        return cls(**json.loads(path.read_text()))


def history_file(out: str | Path) -> Path:
    """Where the ServerApp leaves the round logs for the stage: beside the DVC out, not in it."""
    return Path(f"{Path(out).absolute()}.flower") / "history.json"
