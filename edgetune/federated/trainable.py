"""Which weights a method trains: all of them, or LoRA adapters (peft)."""

from __future__ import annotations

from edgetune.config import BadInput, LoraParams


def wrap_lora(model, lora: LoraParams):
    """Freeze the base model and add LoRA adapters (peft) on lora.targets."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft: target modules not found
        raise BadInput(f"finetune.lora.targets: {e}") from None


def prepare_trainable(model, kind: str, lora: LoraParams):
    """Return the model with exactly the `kind` weights requiring grad ('full' or 'lora')."""
    if kind == "lora":
        return wrap_lora(model, lora)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_model(model, tok, out_dir) -> None:
    """Write an HF folder that from_pretrained loads: LoRA is merged into the base weights."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
