"""Shared fixtures: the data mirror, the real SmolLM2 tokenizer, and a tiny Llama built on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The local dataset mirror: $EDGETUNE_DATA_MIRROR, else ../shared/data beside the repo."""
    path = Path(os.environ.get("EDGETUNE_DATA_MIRROR") or REPO.parent / "shared" / "data")
    assert (path / "sst2" / "train.tsv").is_file(), (
        f"data mirror not found at {path}: set EDGETUNE_DATA_MIRROR to a folder with sst2/train.tsv"
    )
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct tokenizer (from the packaged GGUF), saved as HF files."""
    from transformers import AutoTokenizer

    from edgetune.models import packaged_gguf

    gguf = packaged_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


def save_tiny_llama(tokenizer_dir: Path, out: Path, num_layers: int = 2) -> Path:
    """A `num_layers`-layer, 64-wide Llama with SmolLM2's real tokenizer and vocabulary, saved as HF."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer, 64-wide Llama with SmolLM2's real tokenizer and vocabulary, saved as HF."""
    return save_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sst2_prompts(mirror):
    """A real slice of SST-2 train: 400 rows as (prompts, labels)."""
    from edgetune.tasks import get_task

    ds = get_task("sst2").load("train", mirror).select(range(400))
    return list(ds["prompt"]), list(ds["label"])


# Tests that take minutes on 2 cores (real subprocess kills, fresh-process replays, real-model
# training or compression): marked `slow`, so `make test-fast` leaves them out. Node-id prefixes.
SLOW = (
    "tests/test_dvc_experiments.py",
    "tests/test_pipeline_wiring.py::test_a_compression_chain_reruns_compress_only_and_reloads",
    "tests/test_resume.py::test_killed",
    "tests/test_resume.py::test_other_params_do_not_resume",
    "tests/test_meft.py::test_rebuild_in_a_fresh_process_is_bit_identical",
    "tests/test_oneshot.py::test_compressed_folders_reload_in_a_fresh_process",
    "tests/test_compress.py::test_int8_is_smaller_close_and_reloads_in_a_fresh_process",
    "tests/test_compress.py::test_compress_stage_rejects_a_chain_step_before_loading_any_weights",
    "tests/test_distill.py::test_off_policy_gkd_halves_depth_reloads_and_approaches_the_teacher",
    "tests/test_gpu_check.py::test_gpu_check_dry_run_writes_every_section",
    "tests/test_audit.py::test_exposure_and_membership_auc_rise_when_a_model_memorizes",
    "tests/test_flower.py::test_a_supernode_restarted_mid_run_rejoins_with_new_secagg_keys",
)


def pytest_addoption(parser):
    parser.addoption("--device", default="cuda", help="device of the tests marked gpu (cuda, cuda:N, "
                     "mps or cpu); they are skipped when it is not available")


@pytest.fixture(scope="session")
def device(request):
    """The torch.device the `gpu` tests run on (--device), or a skip when this machine lacks it."""
    from edgetune.config import BadInput
    from edgetune.devices import resolve

    try:
        return resolve(request.config.getoption("--device"))
    except BadInput as e:
        pytest.skip(str(e))


# The longest files, longest first. `--dist loadfile --no-loadscope-reorder` (the Makefile) hands
# files to the two workers in this order, so a long file starts at once instead of last, when one
# worker would run it alone while the other idles (make test-fast on 2 cores: 224 s -> 193 s).
LONGEST_FIRST = (
    "tests/test_pipeline_e2e.py",
    "tests/test_flower.py",
    "tests/test_pipeline_wiring.py",
    "tests/test_benchmark_flow.py",
    "tests/test_dvc_experiments.py",
)


def _file_rank(item) -> int:
    path = item.nodeid.split("::")[0]
    return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_file_rank)  # stable: the other files keep their order
