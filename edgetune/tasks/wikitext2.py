"""WikiText-2 (Merity et al., 2016): the raw test text for perplexity on a fixed slice, and the
validation text for calibrating one-shot compression (never calibrate on what is measured).

Mirror: <mirror>/wikitext2/wiki.test.raw and wiki.valid.tokens (the validation split is only
mirrored in its tokenised form, with `<unk>` for rare words). Hub: Salesforce/wikitext,
wikitext-2-raw-v1.
"""

from __future__ import annotations

from pathlib import Path

from edgetune.tasks.base import require_file

MIRROR_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.tokens"}


def load_text(split: str, mirror: Path | None) -> str:
    if mirror is not None:
        return require_file(mirror / "wikitext2" / MIRROR_FILES[split]).read_text(encoding="utf-8")
    import datasets

    ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
    return "".join(ds["text"])

