"""The default pipeline's data ships with edgetune: same rows as the mirror, checksums checked,
and data.source resolved as documented (auto = mirror, else packaged, else hub)."""

from __future__ import annotations

import shutil

import pytest

from edgetune.config import BadInput
from edgetune.tasks import DataSource, get_task, packaged, resolve_source
from edgetune.tasks.wikitext2 import load_text


@pytest.mark.parametrize("split", ["train", "dev"])
def test_packaged_sst2_rows_equal_the_mirror(mirror, split):
    task = get_task("sst2")
    ours = task.load(split, DataSource("packaged")).to_pandas()
    theirs = task.load(split, DataSource("mirror", mirror)).to_pandas()
    assert len(ours) == {"train": 67349, "dev": 872}[split]
    assert ours.equals(theirs)


@pytest.mark.parametrize("split", ["test", "validation"])
def test_packaged_wikitext_is_the_mirror_text_byte_for_byte(mirror, split):
    assert load_text(split, DataSource("packaged")) == load_text(split, mirror)


def test_manifest_names_the_mirror_files_it_was_built_from(mirror):
    import json

    files = json.loads(packaged.MANIFEST.read_text())["files"]
    for target, source, _ in packaged.FILES.values():
        assert files[target]["from_sha256"] == packaged.sha256(mirror / source)
        assert files[target]["sha256"] == packaged.sha256(packaged.FOLDER / target)


def test_a_modified_packaged_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "packaged"
    shutil.copytree(packaged.FOLDER, copy)
    data = bytearray((copy / "sst2_dev.parquet").read_bytes())
    data[100] ^= 1
    (copy / "sst2_dev.parquet").write_bytes(bytes(data))
    monkeypatch.setattr(packaged, "FOLDER", copy)
    monkeypatch.setattr(packaged, "MANIFEST", copy / "MANIFEST.json")
    with pytest.raises(BadInput, match="sst2_dev.parquet.*sha256 differs"):
        get_task("sst2").load("dev", DataSource("packaged"))


def test_source_auto_prefers_the_mirror_then_packaged_then_hub(mirror, monkeypatch):
    monkeypatch.delenv("EDGETUNE_DATA_MIRROR", raising=False)
    assert resolve_source("auto", None, has_packaged=True) == DataSource("packaged")
    assert resolve_source("auto", None, has_packaged=False) == DataSource("hub")
    assert resolve_source("auto", str(mirror), has_packaged=True) == DataSource("mirror", mirror)
    monkeypatch.setenv("EDGETUNE_DATA_MIRROR", str(mirror))
    assert resolve_source("auto", None, has_packaged=True) == DataSource("mirror", mirror)
    assert resolve_source("packaged", None, has_packaged=True) == DataSource("packaged")
    assert resolve_source("hub", None, has_packaged=True) == DataSource("hub")


def test_an_offline_hub_is_bad_input_naming_the_dataset_and_the_fix(monkeypatch):
    from edgetune.hub import hub_access

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput, match=r"hub for dataset 'x/y' \(offline mode, not in the local cache\); fix it"):
        with hub_access("dataset 'x/y'", "fix it"):
            raise ConnectionError("Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled)")
    with pytest.raises(ValueError):  # not a network error: left alone
        with hub_access("dataset 'x/y'", "fix it"):
            raise ValueError("a bug")
