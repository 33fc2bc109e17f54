"""The default pipeline's data, shipped inside edgetune so that `make run` needs no dataset hub.

edgetune/tasks/packaged/ holds SST-2 train + dev (the GLUE TSVs' `sentence`, `label` columns,
row for row) and the WikiText-2 test (raw) and validation (tokenised) text, one row per line,
as zstd-compressed Parquet. SOURCES.md beside them gives provenance and licences; MANIFEST.json
the sha256 of every file, checked each time a file is read.

Rebuild from a mirror folder (the layout of ../shared/data):
    python -m edgetune.tasks.packaged --mirror ../shared/data
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from edgetune.config import BadInput

FOLDER = Path(__file__).with_name("packaged")
MANIFEST = FOLDER / "MANIFEST.json"
# name -> (file in FOLDER, file in a mirror folder, kind)
FILES = {
    "sst2/train": ("sst2_train.parquet", "sst2/train.tsv", "tsv"),
    "sst2/dev": ("sst2_dev.parquet", "sst2/dev.tsv", "tsv"),
    "wikitext2/test": ("wikitext2_test.parquet", "wikitext2/wiki.test.raw", "text"),
    "wikitext2/validation": ("wikitext2_valid.parquet", "wikitext2/wiki.valid.tokens", "text"),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def has(name: str) -> bool:
    return name in FILES


def checked_file(name: str) -> Path:
    """The packaged file for `name` (e.g. 'sst2/train'), its sha256 checked against MANIFEST.json."""
    if name not in FILES:
        raise BadInput(f"data.source: no packaged data for {name!r}; packaged: {sorted(FILES)}")
    path = FOLDER / FILES[name][0]
    if not path.is_file() or not MANIFEST.is_file():
        raise BadInput(f"packaged data {str(path)!r} is missing (a broken install? reinstall edgetune)")
    expected = json.loads(MANIFEST.read_text())["files"][path.name]["sha256"]
    if sha256(path) != expected:
        raise BadInput(f"packaged data {str(path)!r}: sha256 differs from MANIFEST.json (a modified or "
                       "truncated file; reinstall edgetune or rebuild it with python -m edgetune.tasks.packaged)")
    return path


def read_frame(name: str):
    """A packaged table (SST-2: sentence, label) as a pandas DataFrame."""
    import pandas as pd

    return pd.read_parquet(checked_file(name))


def read_text(name: str) -> str:
    """A packaged text (WikiText-2), byte for byte the mirror's file."""
    import pandas as pd

    return "".join(pd.read_parquet(checked_file(name))["line"])


def mirror_frame(path: Path, kind: str):
    """A mirror file as the table that is packaged: TSV columns as written (labels as ints), or
    one row per line of a text file (line endings kept, so the rows join back to the file)."""
    import pandas as pd

    if kind == "tsv":
        return pd.read_csv(path, sep="\t", quoting=3, dtype={"sentence": str}, keep_default_na=False)
    return pd.DataFrame({"line": path.read_text(encoding="utf-8").splitlines(keepends=True)})


def build(mirror: Path, out: Path = FOLDER) -> dict:
    """Write every packaged file from a mirror folder, and MANIFEST.json with their sha256 and
    the sha256 of the mirror files they came from."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (target, source, kind) in FILES.items():
        frame = mirror_frame(mirror / source, kind)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        pq.write_table(table, out / target, compression="zstd", compression_level=19)
        files[target] = {"name": name, "rows": len(frame), "bytes": (out / target).stat().st_size,
                         "sha256": sha256(out / target), "from": source,
                         "from_sha256": sha256(mirror / source)}
    manifest = {"files": files}
    (out / MANIFEST.name).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Rebuild edgetune's packaged default data from a mirror folder.")
    p.add_argument("--mirror", required=True, help="folder with sst2/{train,dev}.tsv and wikitext2/")
    args = p.parse_args(argv)
    for target, info in build(Path(args.mirror))["files"].items():
        print(f"{target}: {info['rows']} rows, {info['bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
