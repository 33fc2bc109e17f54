"""GKD distillation: a half-depth student that reloads anywhere, moves toward its teacher on
held-out prompts, and is the same for the same seed; its layers are the ones that matter least."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from edgetune.compress import CompressContext, preflight
from edgetune.compress.distill import block_influence, completion_dataset, gkd_distill, keep_layers, student_layers
from edgetune.config import BadInput, GKDStep
from edgetune.models import count_parameters, load_hf
from edgetune.scoring import encode, label_token_ids
from edgetune.tasks import get_task
from tests.conftest import REPO, save_tiny_llama

HELD_OUT = slice(300, 332)  # sst2_prompts rows never used for training (train.parquet is 0..299)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer_dir):
    """A 4-layer, 64-wide Llama on SmolLM2's tokenizer, so drop_layers=2 leaves 2 layers."""
    return save_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("teacher-4l"), num_layers=4)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, sst2_prompts):
    import pandas as pd

    prompts, labels = sst2_prompts
    data_dir = tmp_path_factory.mktemp("data")
    pd.DataFrame({"prompt": prompts[:300], "label": labels[:300]}).to_parquet(data_dir / "train.parquet")
    return CompressContext(calibration=[], data_dir=data_dir, task="sst2")


def kl_teacher_student(teacher, student, tok, prompts) -> float:
    """Mean KL(teacher || student) of the next-token distribution right after each prompt."""
    batch = encode(tok, prompts, 64)
    with torch.no_grad():
        t = F.log_softmax(teacher(**batch, logits_to_keep=1).logits[:, -1], -1)
        s = F.log_softmax(student(**batch, logits_to_keep=1).logits[:, -1], -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean").item()


def test_examples_are_raw_prompt_then_label_word(teacher_dir, ctx):
    _, tok = load_hf(teacher_dir)
    ds = completion_dataset(ctx, tok, GKDStep(steps=2, batch_size=4, loss_on="completion"))
    label_ids = label_token_ids(tok, get_task("sst2").label_words).tolist()
    assert len(ds) == 8
    for row in ds:
        n_prompt = row["completion_mask"].index(1)
        assert row["input_ids"][:n_prompt] == tok(row["prompt"]).input_ids  # no chat template
        assert row["input_ids"][n_prompt] in label_ids
        assert sum(row["completion_mask"]) == len(row["input_ids"]) - n_prompt


def test_sequence_loss_covers_the_prompt_after_its_context(teacher_dir, ctx):
    _, tok = load_hf(teacher_dir)
    for row in completion_dataset(ctx, tok, GKDStep(steps=2, batch_size=4, context_tokens=5)):
        assert row["completion_mask"] == [0] * 5 + [1] * (len(row["input_ids"]) - 5)


def test_block_influence_drops_the_layer_that_changes_nothing(teacher_dir):
    teacher, tok = load_hf(teacher_dir)
    with torch.no_grad():  # layer 2 adds zero to the residual stream: its output is its input
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    batches = [tok("a quiet film that stays with you", return_tensors="pt").input_ids]
    influence = block_influence(teacher, batches)
    assert influence[2] == pytest.approx(0, abs=1e-6) and min(influence[:2] + influence[3:]) > 1e-3
    assert student_layers(teacher, GKDStep(drop_layers=1), batches) == [0, 1, 3]
    assert student_layers(teacher, GKDStep(drop_layers=2, layer_selection="uniform"), batches) == [0, 2]


def test_a_student_without_layers_fails_before_loading(teacher_dir):
    with pytest.raises(BadInput, match="drop_layers 4 leaves no layer of the model's 4"):
        preflight(teacher_dir, [GKDStep(drop_layers=4)])


def test_without_train_data_it_fails_before_loading(tmp_path):
    with pytest.raises(BadInput, match="train split"):
        gkd_distill(tmp_path / "missing", tmp_path / "student", GKDStep(), CompressContext(calibration=[]))


def test_off_policy_gkd_halves_depth_reloads_and_approaches_the_teacher(
        teacher_dir, ctx, sst2_prompts, tmp_path):
    step = GKDStep(drop_layers=2, layer_selection="uniform", loss_on="completion", lmbda=0.0,
                   steps=4, lr=2e-3, batch_size=8, seed=0)
    info = gkd_distill(teacher_dir, tmp_path / "student", step, ctx)
    teacher, tok = load_hf(teacher_dir)
    student, _ = load_hf(tmp_path / "student")

    assert (info["teacher_layers"], info["student_layers"]) == (4, 2)
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert info["params"] == count_parameters(student) < count_parameters(teacher)
    assert 0 < info["params_removed_share"] < 1

    held_out = sst2_prompts[0][HELD_OUT]
    before = kl_teacher_student(teacher, keep_layers(teacher, [0, 2]).eval(), tok, held_out)
    after = kl_teacher_student(teacher, student, tok, held_out)
    assert after < 0.7 * before, (before, after)  # measured: about 0.4x

    code = ("import sys, torch; from transformers import AutoModelForCausalLM as M; "
            "m = M.from_pretrained(sys.argv[1]).eval(); "
            "ids = torch.tensor([[int(t) for t in sys.argv[3:]]]); "
            "torch.save(m(input_ids=ids).logits, sys.argv[2]); "
            "print(type(m).__name__, m.config.num_hidden_layers)")
    ids = tok(held_out[0]).input_ids
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "student"), str(tmp_path / "l.pt"),
                           *map(str, ids)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["LlamaForCausalLM", "2"]
    with torch.no_grad():
        in_process = student(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), in_process)


def test_same_seed_gives_the_same_student(teacher_dir, ctx, tmp_path):
    step = GKDStep(drop_layers=2, lmbda=0.0, steps=2, lr=1e-3, batch_size=2, seed=3)
    for name in ("a", "b"):
        gkd_distill(teacher_dir, tmp_path / name, step, ctx)
    a, _ = load_hf(tmp_path / "a")
    b, _ = load_hf(tmp_path / "b")
    assert torch.equal(a.model.layers[1].mlp.up_proj.weight, b.model.layers[1].mlp.up_proj.weight)


@pytest.mark.parametrize("lmbda, seq_kd", [(1.0, False), (0.0, True)], ids=["on-policy", "seq-kd"])
def test_generation_paths_run(teacher_dir, ctx, tmp_path, lmbda, seq_kd):
    step = GKDStep(drop_layers=2, lmbda=lmbda, seq_kd=seq_kd, max_new_tokens=4, steps=2, batch_size=2)
    info = gkd_distill(teacher_dir, tmp_path / "student", step, ctx)
    assert torch.isfinite(torch.tensor([info["distill_loss_first"], info["distill_loss_last"]])).all()
    assert load_hf(tmp_path / "student")[0].config.num_hidden_layers == 2
