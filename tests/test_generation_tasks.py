"""Generation tasks (SQuAD, DROP, Dolly): loaders and splits, answer loss, greedy answers, scores."""

import json

import pytest
import torch

from edgetune.config import BadInput
from edgetune.generation import answer_loss, encode_answers, end_token_id, generate_answers, score
from edgetune.models import load_hf
from edgetune.tasks import GenerationTask, get_task


def context_of(prompt: str) -> str:
    return prompt.split("\nQuestion:")[0]


# --- loaders -----------------------------------------------------------------------------------

def test_generation_tasks_are_registered():
    for name, metric in [("squad", "squad"), ("drop", "squad"), ("dolly", "rougeL")]:
        task = get_task(name)
        assert isinstance(task, GenerationTask) and task.metric == metric and task.max_new_tokens > 0
    with pytest.raises(ValueError, match="metric"):
        GenerationTask(name="x", hub_id="x", splits=("train", "dev"), loader=None, metric="bleu")


def test_squad_mirror_is_split_by_article(mirror):
    task = get_task("squad")
    train, dev = task.load("train", mirror), task.load("dev", mirror)
    assert len(train) + len(dev) == 1190
    assert len(set(train["title"])) == 36 and len(set(dev["title"])) == 12
    assert not set(train["title"]) & set(dev["title"])
    assert not {context_of(p) for p in train["prompt"]} & {context_of(p) for p in dev["prompt"]}
    for ds in (train, dev):
        for r in ds:
            assert r["prompt"].endswith("\nAnswer:") and r["target"] == " " + r["answers"][0]
            assert all(a in context_of(r["prompt"]) for a in r["answers"])


def test_squad_mirror_with_missing_keys_names_file_and_keys(tmp_path):
    path = tmp_path / "squad_v1.1_dev_subset" / "xquad.en.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"q": 1}]}]}]}))
    with pytest.raises(BadInput, match=r"xquad\.en\.json.*question"):
        get_task("squad").load("train", tmp_path)
    path.unlink()
    with pytest.raises(BadInput, match=r"xquad\.en\.json"):
        get_task("squad").load("train", tmp_path)


def write_drop(folder, split, records):
    (folder / "drop").mkdir(exist_ok=True)
    path = folder / "drop" / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def drop_record(i, spans):
    return {"section_id": "s", "query_id": f"q{i}", "passage": f"Passage {i}: 3 goals by Smith.",
            "question": "Who scored?", "answers_spans": {"spans": spans, "types": ["span"] * len(spans)}}


def test_drop_reads_the_hub_schema_from_a_mirror_file(tmp_path):
    write_drop(tmp_path, "validation", [drop_record(0, ["Smith"]), drop_record(1, ["Smith", "Jones"]),
                                        drop_record(2, [])])  # no answer: dropped
    ds = get_task("drop").load("dev", tmp_path)
    assert ds["query_id"] == ["q0", "q1"]
    assert ds["answers"] == [["Smith"], ["Smith", "Jones"]] and ds["target"] == [" Smith", " Smith"]
    assert ds[0]["prompt"] == "Passage: Passage 0: 3 goals by Smith.\nQuestion: Who scored?\nAnswer:"


def test_drop_without_a_mirror_copy_says_so(tmp_path):
    with pytest.raises(BadInput, match=r"(?i)no copy of DROP.*drop/train\.jsonl"):
        get_task("drop").load("train", tmp_path)
    write_drop(tmp_path, "train", [{"passage": "p", "question": "q"}])
    with pytest.raises(BadInput, match=r"train\.jsonl:1.*answers_spans"):
        get_task("drop").load("train", tmp_path)
    write_drop(tmp_path, "train", [drop_record(0, [])])
    with pytest.raises(BadInput, match="empty"):
        get_task("drop").load("train", tmp_path)


def test_dolly_mirror_keeps_clients_and_categories(mirror):
    task = get_task("dolly")
    train, dev = task.load("train", mirror), task.load("dev", mirror)
    assert len(train) == 15011 - 80 and len(dev) == 80
    assert sorted(set(train["client"])) == list(range(10)) and set(dev["client"]) == {-1}
    assert len(set(train["category"])) == 8 and dev["category"].count("summarization") == 10
    r = train[0]
    assert r["prompt"].startswith("### Instruction:\n") and r["prompt"].endswith("### Response:\n")
    assert r["answers"] == [r["target"]]
    no_context = [p for p in dev["prompt"] if "### Context:" not in p]
    assert 0 < len(no_context) < len(dev)


def test_dolly_mirror_with_missing_keys_names_file_and_keys(tmp_path):
    (tmp_path / "dolly15k").mkdir()
    (tmp_path / "dolly15k" / "global_test.json").write_text(json.dumps([{"instruction": "i", "context": ""}]))
    with pytest.raises(BadInput, match=r"global_test\.json.*response"):
        get_task("dolly").load("dev", tmp_path)
    with pytest.raises(BadInput, match=r"local_training_0\.json"):
        get_task("dolly").load("train", tmp_path)


# --- scores ------------------------------------------------------------------------------------

def test_squad_score_normalizes_and_takes_the_best_reference():
    # "the Eiffel Tower" == "Eiffel Tower" after SQuAD normalization (articles dropped).
    assert score("squad", ["the Eiffel Tower"], [["Eiffel Tower"]]) == {"exact_match": 1.0, "f1": 1.0}
    # vs "Eiffel Tower": P = 2/4, R = 1, F1 = 2/3; vs "Paris": F1 = 0.4; the best counts.
    out = score("squad", ["the Eiffel Tower", "Eiffel Tower in Paris"], [["Eiffel Tower"], ["Eiffel Tower", "Paris"]])
    assert out["exact_match"] == pytest.approx(0.5) and out["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert score("squad", ["Berlin"], [["Paris"]]) == {"exact_match": 0.0, "f1": 0.0}


def test_rouge_l_score():
    assert score("rougeL", ["the cat sat on the mat"], [["the cat sat on the mat"]])["rougeL"] == pytest.approx(1)
    assert score("rougeL", ["dogs bark loudly"], [["the cat sat"]])["rougeL"] == pytest.approx(0)
    # LCS 5 of 6 tokens each way; the best reference counts.
    partial = score("rougeL", ["the cat sat on the mat"], [["zzz", "the cat lay on the mat"]])
    assert partial["rougeL"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        score("bleu", ["a"], [["a"]])


# --- answer loss -------------------------------------------------------------------------------

PROMPTS = ["Context: Paris is in France.\nQuestion: Where is Paris?\nAnswer:",
           "Context: a much longer context about the history of the Eiffel Tower and the city\nQuestion: What?\nAnswer:"]
TARGETS = [" France", " the Eiffel Tower in Paris"]


def test_only_target_tokens_are_labelled_and_the_target_is_never_cut(tiny_model_dir):
    _, tok = load_hf(tiny_model_dir)
    target_ids = tok(TARGETS[1], add_special_tokens=False).input_ids + [tok.eos_token_id]
    batch = encode_answers(tok, [PROMPTS[1] * 20, PROMPTS[0]], [TARGETS[1], TARGETS[0]], max_length=48)
    assert batch["input_ids"].shape[1] == 48  # the long prompt lost tokens on its left
    assert batch["input_ids"][0, -len(target_ids):].tolist() == target_ids
    assert batch["labels"][0][batch["labels"][0] != -100].tolist() == target_ids
    assert (batch["labels"][1] != -100).sum() == len(tok(TARGETS[0], add_special_tokens=False).input_ids) + 1
    capped = encode_answers(tok, ["Q:"], [" word" * 100], max_length=16)
    assert (capped["labels"] != -100).sum() == 8  # targets are capped at max_length // 2 tokens


def test_the_target_ends_with_the_token_generation_stops_at(tiny_model_dir):
    model, tok = load_hf(tiny_model_dir)
    assert end_token_id(model, tok) == model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [7, 8]  # the packaged GGUF: model and tokenizer EOS differ
    assert end_token_id(model, tok) == 7
    batch = encode_answers(tok, PROMPTS[:1], TARGETS[:1], 64, eos_id=7)
    assert batch["input_ids"][0, -1] == 7 and batch["labels"][0, -1] == 7


def test_answer_loss_of_a_row_does_not_depend_on_padding_or_batch(tiny_model_dir):
    model, tok = load_hf(tiny_model_dir)
    with torch.no_grad():
        batched = answer_loss(model, tok, PROMPTS, TARGETS, 128, reduction="none")
        alone = torch.cat([answer_loss(model, tok, [p], [t], 128, reduction="none") for p, t in zip(PROMPTS, TARGETS)])
        mean = answer_loss(model, tok, PROMPTS, TARGETS, 128)
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    n = torch.tensor([len(tok(t, add_special_tokens=False).input_ids) + 1 for t in TARGETS], dtype=torch.float)
    torch.testing.assert_close(mean, (alone * n).sum() / n.sum(), atol=1e-4, rtol=1e-4)  # a token mean
    assert mean.grad_fn is None and mean.ndim == 0


def test_answer_loss_trains_the_target(tiny_model_dir):
    model, tok = load_hf(tiny_model_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = answer_loss(model, tok, PROMPTS[:1], TARGETS[:1], 64)
        opt.zero_grad()
        loss.backward()
        assert model.get_input_embeddings().weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


# --- greedy answers ----------------------------------------------------------------------------

def test_generate_answers_one_line_per_prompt_and_deterministic(tiny_model_dir):
    model, tok = load_hf(tiny_model_dir)
    prompts = PROMPTS + ["### Instruction:\nSay hi.\n\n### Response:\n"]
    first = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=2)
    assert len(first) == 3 and all(isinstance(a, str) and "\n" not in a and a == a.strip() for a in first)
    assert generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=2) == first
