"""FedPepTAO-style federated prefix tuning (Che et al., "Federated Learning of Large Language
Models with Parameter-Efficient Prompt Tuning and Adaptive Optimization", EMNLP 2023).

Prefix tuning (peft) puts trainable key/value vectors in front of every layer's attention;
FedPepTAO trains and exchanges only the prefixes of the layers that matter most, with an
adaptive optimizer on the clients (AdamW) and momentum on the server (`server.optimizer: auto`
is FedAvgM here), against client drift on non-IID data.

Layer selection, as implemented here (written by hand: no library has it):
  round 1 is a scoring round: each client scores every layer's prefix on one local batch and
  uploads the scores only (2 x layers floats);
    curvature  = Hutchinson estimate of the trace of the loss Hessian w.r.t. the layer's prefix
                 (E[v^T H v], v Rademacher, `peptao.hutchinson_samples` probes, double backprop);
    correlation = 1 - mean cosine similarity of the hidden states entering and leaving the
                 layer (how much the layer transforms its input, so how much leverage its
                 prefix has);
  the server normalises each score over layers, adds them, averages over clients, and keeps
  the top `peptao.layer_ratio` share of layers for the rest of the run. Other layers' prefixes
  stay at their (seeded, shared) initial values. Not implemented: the paper's per-device
  control variates for the client optimizer.
"""

from __future__ import annotations

import math

import torch

from edgetune.federated.methods.weights import WeightMethod, sample_batch
from edgetune.federated.protocol import Message
from edgetune.federated.trainable import num_layers

SELECTED = "_selected"  # control tensor: indices of the layers whose prefixes travel


class FedPepTAO(WeightMethod):
    control_keys = (SELECTED,)
    side_tensors = ("_curvature", "_correlation")  # the scoring round's layer scores

    def prepare_model(self, model):
        model = super().prepare_model(model)
        (self.prefix,) = self.blocks.values()  # peft keeps all layers' prefixes in one tensor
        self.num_layers = num_layers(model)
        self.width = self.prefix.shape[1] // self.num_layers  # key + value columns of one layer
        self.blocks = {f"prefix.layer{l}": self.prefix[:, l * self.width:(l + 1) * self.width]
                       for l in range(self.num_layers)}  # views: one block per layer
        self.initial = {k: v.detach().clone() for k, v in self.blocks.items()}
        return model

    def selected(self, tensors) -> list[int] | None:
        return tensors[SELECTED].tolist() if SELECTED in tensors else None

    # ----------------------------------------------------------------- protocol
    def down_keys(self, state):
        layers = self.selected(state) or []
        return [f"prefix.layer{l}" for l in layers]

    def client_update(self, model, down, data, rng):
        self.load(down.tensors)
        layers = self.selected(down.tensors)
        if layers is None:  # scoring round
            curvature, correlation, loss = self.layer_scores(model, data, rng)
            return Message({"_curvature": curvature, "_correlation": correlation},
                           {"num_samples": len(data), "loss": loss})
        keys = [f"prefix.layer{l}" for l in layers]
        keep = {k: v.detach().clone() for k, v in self.blocks.items() if k not in keys}
        loss = self.train_locally(model, [self.prefix], data, rng)
        self.load({**keep, **{k: self.blocks[k].detach().clone() for k in keys}})  # others untouched
        return Message({k: self.blocks[k].detach().clone() for k in keys},
                       {"num_samples": len(data), "loss": loss})

    def layer_scores(self, model, data, rng) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(curvature, correlation, loss) per layer on one local batch."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        batch = self.objective.batch(*sample_batch(data, self.cfg.batch_size, rng))
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
            loss, out = self.objective.forward(model, batch, output_hidden_states=True)
        (grad,) = torch.autograd.grad(loss, self.prefix, create_graph=True)
        curvature = torch.zeros(self.num_layers)
        for _ in range(self.cfg.peptao.hutchinson_samples):
            v = torch.randint(0, 2, self.prefix.shape, generator=rng).float() * 2 - 1
            (hv,) = torch.autograd.grad(grad, self.prefix, v, retain_graph=True)
            curvature += (v * hv).detach().view(v.shape[0], self.num_layers, -1).sum((0, 2))
        curvature /= self.cfg.peptao.hutchinson_samples
        mask = batch["attention_mask"].bool()
        hidden = out.hidden_states  # embeddings, then the output of each layer
        correlation = torch.stack([
            1 - torch.nn.functional.cosine_similarity(hidden[l][mask], hidden[l + 1][mask], dim=-1).mean()
            for l in range(self.num_layers)]).detach()
        return curvature, correlation, loss.item()

    def aggregate(self, state, replies):
        if SELECTED not in state:  # after the scoring round: pick the layers once
            return {**state, SELECTED: self.pick_layers(replies)}
        blocks = {k: state[k] for k in self.blocks}
        return {**self.server.step(blocks, self.client_mean(blocks, replies)), SELECTED: state[SELECTED]}

    def pick_layers(self, replies) -> torch.Tensor:
        def normalised(x: torch.Tensor) -> torch.Tensor:
            x = x.abs()
            return x / x.sum().clamp(min=1e-12)

        scores = sum(r.meta["num_samples"] * (normalised(r.tensors["_curvature"]) +
                                              normalised(r.tensors["_correlation"])) for r in replies)
        k = max(1, math.ceil(self.cfg.peptao.layer_ratio * self.num_layers))
        return torch.sort(torch.topk(scores, k).indices).values.to(torch.int16)

    def round_metrics(self, state):
        return {**super().round_metrics(state), "layers_selected": float(len(self.selected(state) or []))}
