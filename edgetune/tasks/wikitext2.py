"""WikiText-2 (Merity et al., 2016): the raw test text for perplexity on a fixed slice, and the
validation text for calibrating one-shot compression (never calibrate on what is measured).

Mirror: <mirror>/wikitext2/wiki.test.raw and wiki.valid.tokens (the validation split is only
mirrored in its tokenised form, with `<unk>` for rare words). Hub: Salesforce/wikitext,
wikitext-2-raw-v1. Packaged: the mirror's two files ship with edgetune (edgetune/tasks/packaged.py).
"""

from __future__ import annotations

from pathlib import Path

from edgetune.tasks.base import DataSource, require_file

MIRROR_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.tokens"}
HUB_ID = "Salesforce/wikitext"


def load_text(split: str, source: DataSource | Path | None) -> str:
    """The split's text from `source` (a DataSource; a Path means that mirror, None the hub)."""
    source = DataSource.of(source)
    if source.kind == "mirror":
        return require_file(source.mirror / "wikitext2" / MIRROR_FILES[split]).read_text(encoding="utf-8")
    if source.kind == "packaged":
        from edgetune.tasks import packaged

        return packaged.read_text(f"wikitext2/{split}")
    import datasets

    from edgetune.hub import hub_access

    with hub_access(f"dataset {HUB_ID!r} (WikiText-2)", "set data.mirror, $EDGETUNE_DATA_MIRROR or "
                    "data.source: auto (the packaged copy)"):
        ds = datasets.load_dataset(HUB_ID, "wikitext-2-raw-v1", split=split)
    return "".join(ds["text"])

