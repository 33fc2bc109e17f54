"""Classification by label-word logits, shared by training (loss) and evaluation (accuracy).

The prediction for a prompt is the label word whose first token has the highest next-token
logit; the training loss is cross-entropy over those label-word logits only (the candidate
scoring of LM-BFF, Gao et al. 2021, used for classification by MeZO, Malladi et al. 2023).
Prompts are left-padded so the scored position is always the last one, and the LM head runs
on that position only (`logits_to_keep=1`): 49k-way logits for every token would dominate
memory on a small model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_token_ids(tok, label_words) -> torch.Tensor:
    """First token id of each label word; label words must start with distinct tokens."""
    ids = [tok(w, add_special_tokens=False).input_ids[0] for w in label_words]
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {label_words} share a first token: {ids}")
    return torch.tensor(ids)


def encode(tok, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    batch = tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    mask = batch["attention_mask"]
    # Positions count real tokens only, as generate() does for left-padded batches.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": position_ids}


def pick_label_logits(logits: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """(batch, num_labels) float logits of the label words at the last position."""
    return logits[:, -1, :].index_select(-1, label_ids.to(logits.device)).float()


def label_logits(model, batch: dict[str, torch.Tensor], label_ids: torch.Tensor) -> torch.Tensor:
    """(batch, num_labels) next-token logits of the label words after each prompt."""
    batch = {k: v.to(model.device) for k, v in batch.items()}  # a no-op on the CPU
    return pick_label_logits(model(**batch, logits_to_keep=1, use_cache=False).logits, label_ids)


def classification_loss(model, batch, labels: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(label_logits(model, batch, label_ids), labels)


@torch.no_grad()
def predict(model, tok, prompts: list[str], label_ids: torch.Tensor, batch_size: int = 16,
            max_length: int = 128, progress: str | None = None) -> list[int]:
    """Index of the argmax label word after each prompt, in `prompts`' order. Batches hold
    prompts of similar length (sorted by token count, as HF's group_by_length), so little
    compute goes to padding; each prompt's prediction does not depend on its batch."""
    from tqdm.auto import tqdm

    model.eval()
    order = by_length(tok, prompts)
    predictions = [0] * len(prompts)
    for start in tqdm(range(0, len(prompts), batch_size), desc=progress, disable=progress is None,
                      leave=False):
        idx = order[start:start + batch_size]
        batch = encode(tok, [prompts[i] for i in idx], max_length)
        for i, label in zip(idx, label_logits(model, batch, label_ids).argmax(-1).tolist()):
            predictions[i] = label
    return predictions


def accuracy(model, tok, prompts: list[str], labels: list[int], label_ids: torch.Tensor,
             batch_size: int = 16, max_length: int = 128, progress: str | None = None) -> float:
    """Share of prompts whose argmax label word is the gold label."""
    predictions = predict(model, tok, prompts, label_ids, batch_size, max_length, progress)
    return sum(p == g for p, g in zip(predictions, labels)) / max(len(prompts), 1)


def classification_metrics(predictions: list[int], labels: list[int],
                           label_words: tuple[str, ...]) -> dict[str, float]:
    """accuracy, macro-F1 (torchmetrics) and the share of prompts predicted as each label
    (`predicted_share_<word>`): a model that answers one label for everything scores that
    label's rate in accuracy, but its macro-F1 drops and one share nears 1, so a gain that is
    only a moved label bias shows in the same table."""
    from torchmetrics.functional.classification import multiclass_f1_score

    pred, gold = torch.tensor(predictions), torch.tensor(labels)
    n = len(label_words)
    shares = torch.bincount(pred, minlength=n).double() / max(len(pred), 1)
    return {"accuracy": (pred == gold).sum().item() / max(len(pred), 1),  # as accuracy() does
            "macro_f1": multiclass_f1_score(pred, gold, num_classes=n, average="macro").item(),
            **{f"predicted_share_{metric_word(w, i)}": shares[i].item() for i, w in enumerate(label_words)}}


def metric_word(label_word: str, index: int) -> str:
    """A label word as a metric-name suffix: ' Yes' -> 'yes'; the label's index where the word
    has no letters or digits (two such words must not write one key)."""
    return "".join(c for c in label_word.strip().lower() if c.isalnum() or c == "_") or str(index)


def by_length(tok, prompts: list[str]) -> list[int]:
    """Prompt indices, shortest first (stable: equal lengths keep their order)."""
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
    return sorted(range(len(prompts)), key=lengths.__getitem__)
