"""databricks-dolly-15k (Conover et al., 2023): open instruction following, scored by ROUGE-L.

Mirror: <mirror>/dolly15k/local_training_{0..9}.json (`train`) and global_test.json (`dev`,
80 rows, 10 per category), each a JSON list of {instruction, context, response, category}:
the FederatedGPT-Shepherd 10-client split by category (Zhang et al., 2024). `client` keeps the
file index, the natural non-IID client of a train row; it is -1 for `dev`.
Hub: `databricks/databricks-dolly-15k` has only a train split: `dev` is a seeded 1% held out
of it (HOLDOUT_*), `train` the rest, and `client` is -1 (the partition stage assigns clients).
"""

from __future__ import annotations

import json
from pathlib import Path

from edgetune.config import BadInput
from edgetune.tasks.base import GenerationTask, register_task, require_file

TEMPLATE = "### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n"
TEMPLATE_NO_CONTEXT = "### Instruction:\n{instruction}\n\n### Response:\n"  # Alpaca style
KEYS = ("instruction", "context", "response", "category")
CLIENT_FILES = 10
HOLDOUT_SHARE, HOLDOUT_SEED = 0.01, 0  # hub only: the dev split held out of train


def prompt(instruction: str, context: str) -> str:
    if not context.strip():
        return TEMPLATE_NO_CONTEXT.format(instruction=instruction.strip())
    return TEMPLATE.format(instruction=instruction.strip(), context=context.strip())


def row(record: dict, client: int) -> dict:
    response = (record["response"] or "").strip()
    return {"prompt": prompt(record["instruction"], record["context"] or ""), "target": response,
            "answers": [response] if response else [], "category": record["category"], "client": client}


def _read_file(path: Path, client: int) -> list[dict]:
    require_file(path)
    try:
        return [row(r, client) for r in json.loads(path.read_text(encoding="utf-8"))]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInput(f"{path}: expected a JSON list of {{{', '.join(KEYS)}}} ({e!r})") from None


def _read_mirror(split: str, mirror: Path) -> tuple[list[dict], str]:
    folder = mirror / "dolly15k"
    if split == "dev":
        return _read_file(folder / "global_test.json", -1), str(folder / "global_test.json")
    rows = [r for k in range(CLIENT_FILES) for r in _read_file(folder / f"local_training_{k}.json", k)]
    return rows, str(folder / "local_training_*.json")


def _read_hub(split: str) -> tuple[list[dict], str]:
    import datasets

    ds = datasets.load_dataset("databricks/databricks-dolly-15k", split="train")
    parts = ds.train_test_split(test_size=HOLDOUT_SHARE, seed=HOLDOUT_SEED)
    part = parts["train" if split == "train" else "test"]
    return [row(r, -1) for r in part], f"databricks/databricks-dolly-15k train ({split} part)"


def _load(split: str, mirror: Path | None):
    import datasets

    rows, origin = _read_hub(split) if mirror is None else _read_mirror(split, mirror)
    rows = [r for r in rows if r["answers"]]  # an empty response cannot be trained or scored
    if not rows:
        raise BadInput(f"{origin}: dolly/{split} split is empty")
    return datasets.Dataset.from_list(rows)


TASK = register_task(
    GenerationTask(
        name="dolly",
        hub_id="databricks/databricks-dolly-15k",
        splits=("train", "dev"),
        loader=_load,
        metric="rougeL",
        max_new_tokens=64,
        stop=None,  # responses are often multi-line lists
    )
)
