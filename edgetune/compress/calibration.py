"""Calibration sequences for one-shot compression (GPTQ, SparseGPT, Wanda) and pruning
importance: `samples` windows of `seq_len` tokens, drawn at seeded random offsets from one token
stream (GPTQ's recipe, Frantar et al. 2023, which samples random WikiText-2 / C4 windows).

Sources: `wikitext2` = the WikiText-2 validation text (never the test text perplexity is
measured on); `task` = the task's own train prompts, shuffled with the seed and concatenated.
"""

from __future__ import annotations

import random
from pathlib import Path

from edgetune.config import BadInput, CalibrationParams
from edgetune.tasks.base import require_parquet

CALIBRATION_FILE = "calibration.parquet"


def token_stream(text: str, tok) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def sample_windows(ids: list[int], cfg: CalibrationParams, origin: str) -> list[list[int]]:
    """`cfg.samples` windows of `cfg.seq_len` tokens at random offsets (seeded)."""
    if len(ids) < cfg.seq_len + 1:
        raise BadInput(f"compress.calibration.seq_len: {origin} has only {len(ids)} tokens, "
                       f"fewer than one window of {cfg.seq_len}")
    rng = random.Random(cfg.seed)
    starts = [rng.randrange(len(ids) - cfg.seq_len) for _ in range(cfg.samples)]
    return [ids[s:s + cfg.seq_len] for s in starts]


def task_text(train_parquet: Path, cfg: CalibrationParams, max_rows: int = 20_000) -> str:
    """Train prompts, shuffled with the seed, one per line (enough rows for every window)."""
    import pandas as pd

    prompts = pd.read_parquet(train_parquet, columns=["prompt"])["prompt"]
    prompts = prompts.sample(frac=1.0, random_state=cfg.seed).head(max_rows)
    return "\n\n".join(prompts)


def source_file(cfg: CalibrationParams, data_dir: Path) -> Path:
    """The prepared file the windows come from, checked (BadInput naming it if unusable)."""
    if cfg.source == "task":
        return require_parquet(Path(data_dir) / "train.parquet")
    path = Path(data_dir) / "wikitext2_valid.txt"
    if not path.is_file():
        raise BadInput(f"{path}: file not found (re-run the prepare stage)")
    return path


def build(cfg: CalibrationParams, data_dir: Path, tok) -> list[list[int]]:
    path = source_file(cfg, data_dir)
    text = path.read_text(encoding="utf-8") if cfg.source == "wikitext2" else task_text(path, cfg)
    return sample_windows(token_stream(text, tok), cfg, str(path))


def save(windows: list[list[int]], out: Path) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"input_ids": windows}).to_parquet(out / CALIBRATION_FILE)


def load(folder: Path) -> list[list[int]]:
    import pandas as pd

    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        raise BadInput(f"{path}: calibration file missing (run the calibrate stage)")
    return [list(map(int, ids)) for ids in pd.read_parquet(path)["input_ids"]]
