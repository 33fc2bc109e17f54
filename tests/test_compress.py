"""Compression steps write HF folders that reload in a fresh process and stay close to fp32."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from edgetune.compress import apply_steps
from edgetune.config import Int8Step
from edgetune.models import dir_size_bytes, load_hf
from edgetune.scoring import encode
from tests.conftest import REPO


def test_int8_is_smaller_close_and_reloads_in_a_fresh_process(tiny_model_dir, tmp_path):
    out = tmp_path / "int8"
    records = apply_steps(tiny_model_dir, [Int8Step()], out)
    assert records == [{"method": "int8", "bits": 8}]
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        int8 = [k for k in f.keys() if f.get_slice(k).get_dtype() == "I8" and "qdata" in k]
    assert len(int8) == 2 * 7  # every decoder Linear (q, k, v, o, gate, up, down) x 2 layers
    assert dir_size_bytes(out) < dir_size_bytes(tiny_model_dir)

    fp32, tok = load_hf(tiny_model_dir)
    q8, _ = load_hf(out)
    batch = encode(tok, ["Review: a fine film\nSentiment:"], 32)
    with torch.no_grad():
        a, b = fp32(**batch).logits.flatten(), q8(**batch).logits.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99

    code = ("import sys, torch; from transformers import AutoModelForCausalLM as M; "
            "m = M.from_pretrained(sys.argv[1]); "
            "print(type(m.model.layers[0].self_attn.q_proj.weight).__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Int8" in proc.stdout


def test_no_steps_copies_the_model(tiny_model_dir, tmp_path):
    apply_steps(tiny_model_dir, [], tmp_path / "copy")
    assert (tmp_path / "copy" / "config.json").is_file()


def prepared_dir(tmp_path, mirror, sst2_prompts):
    """A prepare-stage folder: WikiText-2 validation text and 400 SST-2 train rows."""
    import pandas as pd

    from edgetune.tasks.wikitext2 import load_text

    (tmp_path / "wikitext2_valid.txt").write_text(load_text("validation", mirror)[:100_000])
    prompts, labels = sst2_prompts
    pd.DataFrame({"prompt": prompts, "label": labels}).to_parquet(tmp_path / "train.parquet")
    return tmp_path


def test_calibration_windows_are_seeded_sized_and_from_the_chosen_source(tmp_path, mirror, sst2_prompts,
                                                                          tokenizer_dir):
    from transformers import AutoTokenizer

    from edgetune.compress import calibration
    from edgetune.config import CalibrationParams

    data, tok = prepared_dir(tmp_path, mirror, sst2_prompts), AutoTokenizer.from_pretrained(tokenizer_dir)
    wiki = calibration.build(CalibrationParams(samples=6, seq_len=32, seed=1), data, tok)
    assert len(wiki) == 6 and {len(w) for w in wiki} == {32}
    assert wiki == calibration.build(CalibrationParams(samples=6, seq_len=32, seed=1), data, tok)
    assert wiki != calibration.build(CalibrationParams(samples=6, seq_len=32, seed=2), data, tok)
    task = calibration.build(CalibrationParams(source="task", samples=6, seq_len=32), data, tok)
    assert sum("Sentiment:" in tok.decode(w) for w in task) >= 3
    calibration.save(wiki, tmp_path / "calib")
    assert calibration.load(tmp_path / "calib") == wiki


def test_calibration_longer_than_the_text_names_the_key(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from edgetune.compress import calibration
    from edgetune.config import BadInput, CalibrationParams

    (tmp_path / "wikitext2_valid.txt").write_text("just a few words")
    with pytest.raises(BadInput, match="compress.calibration.seq_len"):
        calibration.build(CalibrationParams(seq_len=64), tmp_path, AutoTokenizer.from_pretrained(tokenizer_dir))


def test_compress_stage_rejects_a_chain_step_before_loading_any_weights(tiny_model_dir, tmp_path):
    """structural then GPTQ with a group size that divides the model now but not after pruning:
    exit 2 with one line naming the step, no output for DVC, no MLflow run left RUNNING."""
    import mlflow
    import yaml

    from edgetune.compress import calibration

    steps = [{"method": "structural", "ratio": 0.00095, "recovery_steps": 0},
             {"method": "gptq", "bits": 4, "group_size": 16}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"compress": {"steps": steps}}))
    calibration.save([[1, 2, 3, 4]] * 2, tmp_path / "calib")
    (tmp_path / "data").mkdir()
    cmd = [sys.executable, "-m", "stages.compress", "--params", str(tmp_path / "params.yaml"),
           "--model", str(tiny_model_dir), "--data", str(tmp_path / "data"), "--calibration",
           str(tmp_path / "calib"), "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json")]
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "gptq group_size 16" in errors[0] and "intermediate_size 120" in errors[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status == "FAILED" for r in runs)
