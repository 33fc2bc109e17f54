"""FedIT: federated instruction tuning with LoRA (Zhang et al., "Towards Building the
Federated GPT", ICASSP 2024) -- clients train LoRA adapters locally with AdamW and upload
them; the server averages them weighted by client sample counts (FedAvg, McMahan et al. 2017).

LoRA itself is peft's; the weighted mean is Flower's `aggregate`. Only adapter weights travel.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgetune.federated.engine import ClientData
from edgetune.federated.methods.base import FederatedMethod
from edgetune.federated.protocol import Message
from edgetune.federated.trainable import wrap_lora
from edgetune.scoring import classification_loss, encode


def sample_batch(data: ClientData, batch_size: int, rng: torch.Generator):
    idx = torch.randint(len(data), (batch_size,), generator=rng).tolist()
    return [data.prompts[i] for i in idx], torch.tensor([data.labels[i] for i in idx])


def weighted_mean(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """FedAvg: the sample-weighted mean of each tensor, via Flower's aggregate()."""
    from flwr.server.strategy.aggregate import aggregate

    keys = list(states[0])
    arrays = [([s[k].float().numpy() for k in keys], int(w)) for s, w in zip(states, weights)]
    averaged = aggregate(arrays)
    return {k: torch.from_numpy(a).to(states[0][k].dtype) for k, a in zip(keys, averaged)}


class FedIT(FederatedMethod):
    def prepare_model(self, model):
        return wrap_lora(model, self.cfg.lora)

    def init_state(self, model):
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    def downlink(self, state):
        return Message(tensors=state)

    def client_update(self, model, down, data, rng):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        set_peft_model_state_dict(model, down.tensors)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        losses = []
        for _ in range(self.cfg.local_steps):
            prompts, labels = sample_batch(data, self.cfg.batch_size, rng)
            batch = encode(self.tok, prompts, self.cfg.max_length)
            loss = classification_loss(model, batch, labels, self.label_ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        return Message(tensors=state, meta={"num_samples": len(data), "loss": sum(losses) / len(losses)})

    def aggregate(self, state, replies):
        return weighted_mean([r.tensors for r in replies], [r.meta["num_samples"] for r in replies])

    def apply_global(self, model, state):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)

    def export(self, model, state, out_dir):
        self.apply_global(model, state)
        model.save_pretrained(Path(out_dir) / "adapter")  # the adapter alone, as peft saves it
        super().export(model, state, out_dir)
