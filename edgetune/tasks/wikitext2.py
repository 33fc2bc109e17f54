"""WikiText-2 (Merity et al., 2016) raw test text, for perplexity on a fixed slice.

Mirror: <mirror>/wikitext2/wiki.test.raw. Hub: Salesforce/wikitext, wikitext-2-raw-v1, test.
"""

from __future__ import annotations

from pathlib import Path

from edgetune.tasks.base import require_file


def load_test_text(mirror: Path | None) -> str:
    if mirror is not None:
        return require_file(mirror / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    import datasets

    ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
    return "".join(ds["text"])
