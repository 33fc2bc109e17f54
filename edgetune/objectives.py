"""What fine-tuning minimises on a task, split into `batch` (encode once) and `loss` (one
forward), so zeroth-order methods encode a batch once and evaluate the loss at several
perturbed weights, and backprop methods call both in turn.

- `LabelWords` (classification): cross-entropy over the label words' next-token logits after
  the prompt (LM-BFF, Gao et al. 2021; MeZO, Malladi et al. 2023).
- `Answer` (generation): next-token cross-entropy on the reference answer's tokens only, the
  prompt being context (MeZO's SQuAD / DROP setup).
"""

from __future__ import annotations

import torch


class LabelWords:
    target_column = "label"

    def __init__(self, tok, label_words, max_length: int):
        from edgetune.scoring import label_token_ids

        self.tok, self.max_length = tok, max_length
        self.label_ids = label_token_ids(tok, label_words)

    def batch(self, prompts: list[str], targets: list) -> dict[str, torch.Tensor]:
        from edgetune.scoring import encode

        return {**encode(self.tok, prompts, self.max_length), "labels": torch.as_tensor(targets)}

    def forward(self, model, batch, reduction: str = "mean", **forward_kwargs):
        """(loss, model output); the LM head runs on the last position only. reduction "none":
        each row's loss."""
        from edgetune.scoring import pick_label_logits

        inputs = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
        out = model(**inputs, logits_to_keep=1, use_cache=False, **forward_kwargs)
        logits = pick_label_logits(out.logits, self.label_ids)
        return torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device), reduction=reduction), out

    def loss(self, model, batch) -> torch.Tensor:
        return self.forward(model, batch)[0]

    def row_losses(self, model, batch) -> torch.Tensor:
        return self.forward(model, batch, reduction="none")[0]


class Answer:
    target_column = "target"

    def __init__(self, tok, max_length: int, eos_id: int):
        self.tok, self.max_length, self.eos_id = tok, max_length, eos_id

    def batch(self, prompts: list[str], targets: list) -> dict[str, torch.Tensor]:
        from edgetune.generation import encode_answers

        return encode_answers(self.tok, prompts, list(targets), self.max_length, self.eos_id)

    def forward(self, model, batch, reduction: str = "mean", **forward_kwargs):
        from edgetune.generation import answer_batch_loss

        return answer_batch_loss(model, batch, reduction, **forward_kwargs)

    def loss(self, model, batch) -> torch.Tensor:
        return self.forward(model, batch)[0]

    def row_losses(self, model, batch) -> torch.Tensor:
        """Each row's mean answer-token loss."""
        return self.forward(model, batch, reduction="none")[0]


def objective_for(task, tok, max_length: int, model=None):
    """The objective of `task` (a ClassificationTask or a GenerationTask)."""
    from edgetune.tasks import GenerationTask

    if isinstance(task, GenerationTask):
        from edgetune.generation import end_token_id

        eos = end_token_id(model, tok) if model is not None else tok.eos_token_id
        return Answer(tok, max_length, eos)
    return LabelWords(tok, task.label_words, max_length)
