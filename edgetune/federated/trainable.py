"""Which weights a method trains, and how they are cut into named blocks that travel.

Trainable sets: all weights (`full`); peft adapters (`lora`, `prefix`, `prompt`); `bitfit`
(bias terms, Ben Zaken et al. 2022 -- Llama-family models have none, so their RMSNorm gains
stand in, as in LayerNorm tuning); `layers` (whole transformer layers, chosen per client by
FedSelFT, so every decoder layer is made trainable and the method freezes all but its choice).
"""

from __future__ import annotations

import re

import torch

from edgetune.config import BadInput, FinetuneParams

LAYER = re.compile(r"\.layers\.(\d+)\.")


def wrap_peft(model, kind: str, cfg: FinetuneParams, tok=None):
    """Freeze the base model and add peft adapters of `kind` (lora / prefix / prompt)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    if kind == "lora":
        lora = cfg.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.targets), task_type="CAUSAL_LM",
                            init_lora_weights=lora.peft_init)
    elif kind == "prefix":
        config = PrefixTuningConfig(num_virtual_tokens=cfg.prefix.num_virtual_tokens, task_type="CAUSAL_LM")
    else:
        text = cfg.prompt.init_text
        config = PromptTuningConfig(
            num_virtual_tokens=cfg.prompt.num_virtual_tokens, task_type="CAUSAL_LM",
            prompt_tuning_init="TEXT" if text else "SAMPLE_VOCAB", prompt_tuning_init_text=text,
            tokenizer_name_or_path=getattr(model, "name_or_path", None) if text else None)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # peft: target modules not found
        raise BadInput(f"finetune.{kind}: {e}") from None
    if kind == "prefix" and tok is not None:
        n = cfg.prefix.num_virtual_tokens
        ids = tok(cfg.prefix.init_text, add_special_tokens=False).input_ids
        init_prefix_from_text(peft_model, (ids * n)[:n])
    return peft_model


@torch.no_grad()
def init_prefix_from_text(peft_model, token_ids: list[int]) -> None:
    """Start the prefixes as the keys and values the model itself computes for `token_ids`
    (Li & Liang 2021, sec. 7.2: real-word activations, not random vectors, which would swamp
    every layer's attention). peft lays one virtual token's prefix out as
    (layers x [key, value]) x kv-heads x head-dim, which is how the cache is read here."""
    cache = peft_model.get_base_model()(torch.tensor([token_ids]), use_cache=True).past_key_values
    rows = [torch.cat([torch.cat([layer.keys[0, :, t].flatten(), layer.values[0, :, t].flatten()])
                       for layer in cache.layers]) for t in range(len(token_ids))]
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    embedding.copy_(torch.stack(rows).to(embedding.dtype))


def is_bitfit(name: str) -> bool:
    return name.endswith(".bias") or name.endswith("norm.weight")


def prepare_trainable(model, kind: str, cfg: FinetuneParams, tok=None):
    """Return the model with exactly the `kind` weights requiring grad (`tok` initialises
    prefixes from text; without it they keep peft's random init)."""
    if kind in ("lora", "prefix", "prompt"):
        return wrap_peft(model, kind, cfg, tok)
    for name, p in model.named_parameters():
        p.requires_grad_(kind == "full" or (kind == "bitfit" and is_bitfit(name))
                         or (kind == "layers" and LAYER.search(name) is not None))
    return model


def trainable_blocks(model) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by name, in model order: what a weight message carries."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def layer_of(name: str) -> int | None:
    """Decoder layer index of a parameter name (model.layers.<i>.…), None outside the layers."""
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def save_model(model, tok, out_dir) -> None:
    """Write a folder `edgetune.models.load_hf` loads. LoRA is merged into the base weights (a
    plain HF folder that from_pretrained loads); prefix / prompt tuning cannot be merged, so
    the adapter is written with its base model in <out_dir>/base (an adapter folder)."""
    from pathlib import Path

    from peft import PeftModel

    from edgetune.models import ADAPTER_BASE, save_tokenizer

    out_dir = Path(out_dir)
    if isinstance(model, PeftModel) and model.peft_config["default"].peft_type.value != "LORA":
        model.save_pretrained(out_dir)
        model = model.get_base_model()
        out_dir = out_dir / ADAPTER_BASE
    elif isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    save_tokenizer(tok, out_dir)
