"""Generation tasks: the answer loss used for training, greedy answers and their scores.

Training: next-token cross-entropy on the target (reference answer) tokens only, the prompt
being context (the SQuAD / DROP generation setup of MeZO, Malladi et al. 2023). Batches are
left-padded as in `scoring.encode`, so every row's target ends at the last position and the
LM head runs on the last target-length positions only (`logits_to_keep`).
Evaluation: greedy decoding, the answer cut at its first newline, scored with torchmetrics
(SQuAD exact match / F1, Rajpurkar et al. 2016; ROUGE-L, Lin 2004).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgetune.scoring import encode


def end_token_id(model, tok) -> int:
    """The token generate() stops at: the model's generation EOS (the first, if several), else
    the tokenizer's. They differ for the packaged GGUF: transformers reads SmolLM2's tokenizer
    EOS as <|im_start|> (id 1) while the model's config says <|im_end|> (id 2)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return tok.eos_token_id if eos is None else int(eos)


def encode_answers(tok, prompts: list[str], targets: list[str], max_length: int,
                   eos_id: int | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids + target ids + EOS (`eos_id`, default the tokenizer's), with
    `labels` = -100 except on the target. The target is capped at max_length // 2 tokens (EOS
    included) and never cut otherwise; the prompt loses tokens from its left to fit."""
    if max_length < 2:
        raise ValueError(f"encode_answers: max_length must be at least 2, got {max_length}")
    eos_id = tok.eos_token_id if eos_id is None else eos_id
    rows, n_target = [], []
    for p, t in zip(prompts, targets, strict=True):
        t_ids = (tok(t, add_special_tokens=False).input_ids + [eos_id])[:max_length // 2]
        p_ids = tok(p).input_ids[-(max_length - len(t_ids)):]
        if not p_ids:
            raise ValueError(f"encode_answers: empty prompt for target {t!r}")
        rows.append(p_ids + t_ids)
        n_target.append(len(t_ids))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, n) in enumerate(zip(rows, n_target)):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
        labels[i, width - n:] = torch.tensor(r[-n:])
    # Positions count real tokens only, as scoring.encode and generate() do.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


def answer_batch_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean", **forward_kwargs):
    """(loss, model output) of an `encode_answers` batch: cross-entropy of the target tokens
    given the prompt, the mean over all target tokens ("mean") or each row's mean ("none")."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"answer_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    labels = batch["labels"].to(model.device)
    keep = int((labels != -100).sum(-1).max()) + 1  # the positions that predict target tokens
    inputs = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
    out = model(**inputs, logits_to_keep=keep, use_cache=False, **forward_kwargs)
    # Position j predicts token j + 1.
    token_loss = F.cross_entropy(out.logits.float()[:, :-1].transpose(1, 2), labels[:, -keep + 1:],
                                 reduction="none")
    counted = (labels[:, -keep + 1:] != -100).float()
    if reduction == "none":
        return (token_loss * counted).sum(-1) / counted.sum(-1), out
    return (token_loss * counted).sum() / counted.sum(), out


def answer_loss(model, tok, prompts: list[str], targets: list[str], max_length: int,
                reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the target tokens given the prompt (see answer_batch_loss). The target
    ends with the token generation stops at, so training teaches the model where to stop."""
    batch = encode_answers(tok, prompts, targets, max_length, end_token_id(model, tok))
    return answer_batch_loss(model, batch, reduction)[0]


@torch.no_grad()
def generate_answers(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                     max_length: int = 512, progress: str | None = None, stop: str | None = "\n") -> list[str]:
    """Greedy answers, new text only, cut at the first `stop` (after leading whitespace) and
    stripped. Prompts are left-truncated to max_length tokens (the new tokens come on top)."""
    from tqdm.auto import tqdm

    model.eval()
    answers = []
    steps = range(0, len(prompts), batch_size)
    for start in tqdm(steps, desc=progress, disable=progress is None, leave=False):
        batch = encode(tok, prompts[start:start + batch_size], max_length)
        # generate() derives the same position ids from the attention mask.
        out = model.generate(input_ids=batch["input_ids"].to(model.device),
                             attention_mask=batch["attention_mask"].to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for text in tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False):
            text = text.strip()
            answers.append((text.split(stop, 1)[0] if stop else text).strip())
    return answers


def score(metric: str, predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    """Metric "squad" gives {"exact_match", "f1"} (SQuAD normalization, best over references) as
    fractions; "rougeL" gives {"rougeL"}, the ROUGE-L F-measure, best over references. Both are
    averaged over prompts."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(f"score: need as many predictions as answer lists, at least one "
                         f"(got {len(predictions)} and {len(answers)})")
    if metric == "squad":
        from torchmetrics.text import SQuAD

        preds = [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)]
        target = [{"answers": {"text": list(a), "answer_start": [0] * len(a)}, "id": str(i)}
                  for i, a in enumerate(answers)]
        out = SQuAD()(preds, target)  # percentages
        return {"exact_match": out["exact_match"].item() / 100, "f1": out["f1"].item() / 100}
    if metric == "rougeL":
        from torchmetrics.text.rouge import ROUGEScore

        out = ROUGEScore(rouge_keys="rougeL", accumulate="best")(list(predictions), [list(a) for a in answers])
        return {"rougeL": out["rougeL_fmeasure"].item()}
    raise ValueError(f"score: unknown metric {metric!r}; expected 'squad' or 'rougeL'")
