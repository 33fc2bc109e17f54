"""SQuAD v1.1 (Rajpurkar et al., 2016): extractive QA answered by generation; exact match + F1.

Hub: `rajpurkar/squad` (train / validation), the real splits.
Mirror: <mirror>/squad_v1.1_dev_subset/xquad.en.json, SQuAD v1.1 JSON ({data: [{title,
paragraphs: [{context, qas: [{id, question, answers: [{text}]}]}]}]}): XQuAD-en, 48 articles
and 1,190 questions, ALL from SQuAD dev; the mirror has no SQuAD train. So the mirror's
splits are cut by article, no context shared: `train` = the first 36 articles, `dev` = the
last 12. Mirror scores are therefore not comparable with published SQuAD dev numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgetune.config import BadInput
from edgetune.tasks.base import GenerationTask, register_task, require_file

TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
MIRROR_FILE = Path("squad_v1.1_dev_subset") / "xquad.en.json"
MIRROR_DEV_ARTICLES = 12  # the last 12 of the mirror's 48 articles are `dev`, the rest `train`
SHAPE = "{data: [{title, paragraphs: [{context, qas: [{id, question, answers: [{text}]}]}]}]}"


def prompt(context: str, question: str) -> str:
    return TEMPLATE.format(context=context.strip(), question=question.strip())


def row(title: str, context: str, qid: str, question: str, answers: list[str]) -> dict:
    """One example; the target has a leading space because the prompt ends with "Answer:"."""
    answers = [a.strip() for a in answers if a.strip()]
    return {"prompt": prompt(context, question), "target": " " + answers[0] if answers else "",
            "answers": answers, "id": qid, "title": title}


def _read_mirror(split: str, mirror: Path) -> tuple[list[dict], str]:
    path = require_file(mirror / MIRROR_FILE)
    try:
        articles = [[row(a["title"], p["context"], q["id"], q["question"], [x["text"] for x in q["answers"]])
                     for p in a["paragraphs"] for q in p["qas"]]
                    for a in json.loads(path.read_text(encoding="utf-8"))["data"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInput(f"{path}: expected SQuAD v1.1 JSON {SHAPE} ({e!r})") from None
    cut = max(len(articles) - MIRROR_DEV_ARTICLES, 0)
    return [r for a in (articles[:cut] if split == "train" else articles[cut:]) for r in a], str(path)


def _load(split: str, mirror: Path | None):
    import datasets

    if mirror is None:
        hub_split = {"train": "train", "dev": "validation"}[split]
        ds = datasets.load_dataset("rajpurkar/squad", split=hub_split)
        rows = [row(t, c, i, q, list(a["text"]))
                for t, c, i, q, a in zip(ds["title"], ds["context"], ds["id"], ds["question"], ds["answers"])]
        origin = f"rajpurkar/squad {hub_split}"
    else:
        rows, origin = _read_mirror(split, mirror)
    rows = [r for r in rows if r["answers"]]  # SQuAD v1.1 questions all have one; be safe
    if not rows:
        raise BadInput(f"{origin}: squad/{split} split is empty")
    return datasets.Dataset.from_list(rows)


TASK = register_task(
    GenerationTask(
        name="squad",
        hub_id="rajpurkar/squad",
        splits=("train", "dev"),
        loader=_load,
        metric="squad",
        max_new_tokens=16,
    )
)
