"""Label-word scoring: padding does not change a prompt's score; labels map to distinct tokens."""

import pytest
import torch

from edgetune.models import load_hf
from edgetune.scoring import accuracy, classification_metrics, encode, label_logits, label_token_ids, predict
from edgetune.tasks import get_task


def test_left_padding_does_not_change_scores(tiny_model_dir):
    model, tok = load_hf(tiny_model_dir)
    ids = label_token_ids(tok, get_task("sst2").label_words)
    prompts = ["Review: fine\nSentiment:", "Review: a much longer and rather dull film\nSentiment:"]
    with torch.no_grad():
        batched = label_logits(model, encode(tok, prompts, 64), ids)
        alone = torch.cat([label_logits(model, encode(tok, [p], 64), ids) for p in prompts])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


def test_label_words_are_distinct_single_tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = label_token_ids(tok, get_task("sst2").label_words)
    assert len(set(ids.tolist())) == 2


def test_accuracy_matches_argmax(tiny_model_dir, sst2_prompts):
    model, tok = load_hf(tiny_model_dir)
    ids = label_token_ids(tok, get_task("sst2").label_words)
    prompts, labels = sst2_prompts[0][:20], sst2_prompts[1][:20]
    with torch.no_grad():
        pred = label_logits(model, encode(tok, prompts, 64), ids).argmax(-1)
    expected = (pred == torch.tensor(labels)).sum().item() / len(labels)
    assert abs(accuracy(model, tok, prompts, labels, ids, batch_size=7) - expected) < 1e-9
    assert predict(model, tok, prompts, ids, batch_size=7) == pred.tolist()  # in the prompts' order


def test_a_model_that_answers_one_label_shows_it_in_macro_f1_and_the_predicted_shares():
    """Accuracy alone cannot tell a learned task from a moved label bias: always answering
    'positive' on a 3:1 positive dev set scores 0.75, but macro-F1 is (0 + 6/7) / 2."""
    gold = [1, 1, 1, 0] * 5
    biased = classification_metrics([1] * 20, gold, (" negative", " positive"))
    assert biased["accuracy"] == 0.75
    assert biased["macro_f1"] == pytest.approx((0 + 2 * 0.75 / 1.75) / 2)
    assert (biased["predicted_share_negative"], biased["predicted_share_positive"]) == (0.0, 1.0)
    perfect = classification_metrics(gold, gold, (" Yes", " No"))
    assert perfect["macro_f1"] == 1.0 and perfect["predicted_share_yes"] == 0.25
    symbols = classification_metrics([0, 1, 1], [0, 1, 1], (" +", " -"))  # no letters: keyed by index
    assert (symbols["predicted_share_0"], symbols["predicted_share_1"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
