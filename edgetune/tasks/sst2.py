"""SST-2 (GLUE; Socher et al., 2013): binary sentiment, scored by accuracy.

Mirror layout: <mirror>/sst2/{train,dev}.tsv with columns `sentence`, `label` (GLUE format).
Hub: `stanfordnlp/sst2` (train / validation). Packaged: both splits ship with edgetune
(edgetune/tasks/packaged.py), the mirror's rows as they are.
"""

from __future__ import annotations

from pathlib import Path

from edgetune.config import BadInput
from edgetune.tasks.base import ClassificationTask, register_task, require_file

TEMPLATE = "Review: {sentence}\nSentiment:"
LABEL_WORDS = (" negative", " positive")  # label 0, label 1


def prompt(sentence: str) -> str:
    return TEMPLATE.format(sentence=sentence.strip())


def _load(split: str, mirror: Path | None):
    import datasets
    import pandas as pd

    if mirror is None:
        hub_split = {"train": "train", "dev": "validation"}[split]
        ds = datasets.load_dataset("stanfordnlp/sst2", split=hub_split)
        frame = ds.to_pandas()[["sentence", "label"]]
        origin = f"stanfordnlp/sst2 {hub_split}"
    else:
        path = require_file(mirror / "sst2" / f"{split}.tsv")
        try:
            # GLUE TSVs are not CSV-quoted: quotes are literal characters.
            frame = pd.read_csv(path, sep="\t", quoting=3, dtype={"sentence": str})
        except Exception as e:  # pandas raises a zoo of parser errors
            raise BadInput(f"{path}: not a readable TSV ({e})") from None
        missing = {"sentence", "label"} - set(frame.columns)
        if missing:
            raise BadInput(f"{path}: missing column(s) {sorted(missing)}; expected sentence, label")
        origin = str(path)
    return to_dataset(frame, origin, split)


def _load_packaged(split: str):
    from edgetune.tasks import packaged

    return to_dataset(packaged.read_frame(f"sst2/{split}"), f"packaged sst2/{split}", split)


def to_dataset(frame, origin: str, split: str):
    """Rows with `sentence`, `label` as a Dataset of `prompt`, `label`, labels checked."""
    import datasets
    import pandas as pd

    if frame.empty:
        raise BadInput(f"{origin}: sst2/{split} split is empty")
    frame = frame.dropna(subset=["sentence"])
    bad = frame["label"][~pd.to_numeric(frame["label"], errors="coerce").isin([0, 1])]
    if len(bad):
        raise BadInput(f"{origin}: label {str(bad.iloc[0])!r} is not 0 (negative) or 1 (positive)")
    frame = frame.assign(prompt=frame["sentence"].map(prompt), label=frame["label"].astype(int))
    return datasets.Dataset.from_pandas(frame[["prompt", "label"]], preserve_index=False)


TASK = register_task(
    ClassificationTask(
        name="sst2",
        hub_id="stanfordnlp/sst2",
        splits=("train", "dev"),
        loader=_load,
        packaged_loader=_load_packaged,
        label_words=LABEL_WORDS,
    )
)
