"""Resume a killed finetune stage from its last completed round.

The stage's outputs are DVC outs, removed when the stage fails, so the resume state lives
beside them in `<out>.resume/`, which DVC never touches and the stage removes once it succeeds:

    fingerprint      hash of the params and inputs that shape training; a folder written under
                     another fingerprint is wiped, so a changed run never resumes a stale one
    run_id           the MLflow run of the attempt that writes here (a killed one stays RUNNING)
    round-NNNN.pt    after round N (torch.save, write-then-rename, older rounds then removed):
                     the global state, the client-sampling generator's bit_generator.state,
                     torch's global RNG state, the round history (metrics and plots) and the
                     method's own state outside the global state (e.g. server optimizer moments)

Everything else a round needs is derived from (seed, round, client) alone (engine.py), so a
resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch


def fingerprint(params: dict, inputs: list[Path]) -> str:
    """Hash of `params` and of each input file's path, size and mtime (cheap, and any rewrite of
    an input changes it)."""
    files = sorted(f for p in inputs for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps([params, stats], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResumeFolder:
    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint
        stamp, run = self.folder / "fingerprint", self.folder / "run_id"
        self.previous_run = run.read_text() if run.is_file() else None  # kept even if wiped
        if self.folder.exists() and (not stamp.is_file() or stamp.read_text() != fingerprint):
            shutil.rmtree(self.folder)  # written by a run with other params or inputs
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)

    @classmethod
    def beside(cls, out: Path, fingerprint: str) -> "ResumeFolder":
        return cls(Path(f"{Path(out).absolute()}.resume"), fingerprint)

    def checkpoints(self) -> list[Path]:
        return sorted(self.folder.glob("round-*.pt"))

    def last_round(self) -> int:
        """The last completed round saved here (0: none)."""
        files = self.checkpoints()
        return int(files[-1].stem.split("-")[1]) if files else 0

    def load(self) -> dict | None:
        files = self.checkpoints()
        return torch.load(files[-1], weights_only=False) if files else None

    def save(self, round_: int, payload: dict) -> None:
        tmp = self.folder / "round.tmp"
        torch.save(payload, tmp)
        tmp.replace(self.folder / f"round-{round_:04d}.pt")
        for old in self.checkpoints()[:-1]:
            old.unlink()

    def record_run(self, run_id: str) -> None:
        (self.folder / "run_id").write_text(run_id)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
