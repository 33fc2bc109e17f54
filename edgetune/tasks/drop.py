"""DROP (Dua et al., NAACL 2019): discrete reasoning over paragraphs, answered by generation.

Hub: `ucinlp/drop` (train / validation; columns query_id, passage, question, answers_spans
{spans, types}). The data mirror has NO copy of DROP (none small enough was found); a mirror
copy would be <mirror>/drop/{train,validation}.jsonl, one JSON object per line with the hub's
columns. With a mirror configured and that file absent, loading fails (BadInput).

Scored with the SQuAD metric (exact match + token F1) as an approximation of DROP's answer F1:
as in MeZO (Malladi et al., 2023), each span is one alternative reference and the first span is
the training target. The official DROP F1 also aligns multi-span answers as a set and compares
numbers exactly; this does not, so scores are not comparable with the DROP leaderboard.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgetune.config import BadInput
from edgetune.tasks.base import GenerationTask, register_task, require_file

TEMPLATE = "Passage: {passage}\nQuestion: {question}\nAnswer:"
HUB_SPLITS = {"train": "train", "dev": "validation"}
KEYS = ("passage", "question", "answers_spans")


def prompt(passage: str, question: str) -> str:
    return TEMPLATE.format(passage=passage.strip(), question=question.strip())


def row(qid: str, passage: str, question: str, spans: list[str]) -> dict:
    """One example; the target has a leading space because the prompt ends with "Answer:"."""
    answers = [s.strip() for s in spans if s.strip()]
    return {"prompt": prompt(passage, question), "target": " " + answers[0] if answers else "",
            "answers": answers, "query_id": qid}


def mirror_path(split: str, mirror: Path) -> Path:
    path = mirror / "drop" / f"{HUB_SPLITS[split]}.jsonl"
    try:
        return require_file(path)
    except BadInput:
        raise BadInput(f"drop: the data mirror {str(mirror)!r} has no copy of DROP; expected {str(path)!r} "
                       f"(JSON lines with the ucinlp/drop columns {', '.join(KEYS)}), "
                       f"or unset the mirror to load DROP from the hub") from None


def _read_mirror(split: str, mirror: Path) -> tuple[list[dict], str]:
    path = mirror_path(split, mirror)
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                spans = list(r["answers_spans"]["spans"])
                rows.append(row(str(r.get("query_id", n)), r["passage"], r["question"], spans))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise BadInput(f"{path}:{n}: expected a JSON object with keys {', '.join(KEYS)} "
                               f"(answers_spans = {{spans, types}}) ({e!r})") from None
    return rows, str(path)


def _load(split: str, mirror: Path | None):
    import datasets

    if mirror is None:
        ds = datasets.load_dataset("ucinlp/drop", split=HUB_SPLITS[split])
        rows = [row(i, p, q, list(a["spans"]))
                for i, p, q, a in zip(ds["query_id"], ds["passage"], ds["question"], ds["answers_spans"])]
        origin = f"ucinlp/drop {HUB_SPLITS[split]}"
    else:
        rows, origin = _read_mirror(split, mirror)
    rows = [r for r in rows if r["answers"]]  # a question without an answer cannot be trained or scored
    if not rows:
        raise BadInput(f"{origin}: drop/{split} split is empty")
    return datasets.Dataset.from_list(rows)


TASK = register_task(
    GenerationTask(
        name="drop",
        hub_id="ucinlp/drop",
        splits=("train", "dev"),
        loader=_load,
        metric="squad",
        max_new_tokens=16,
    )
)
