"""FedSelFT: selective layer fine-tuning in federated learning (Sun et al., "Exploring Selective
Layer Fine-Tuning in Federated Learning", ISIT 2025). Each client trains only a few whole
transformer layers (its own budget, finetune.selft.layers, so weak devices train fewer) and
uploads the new values of those layers; the server averages each layer over the clients that
trained it. Clients hold the pretrained model, so the server only sends layers that have moved
away from it.

Strategies (finetune.selft.strategy): `top`, `bottom`, `both` (half from each end), `random`
(per client and round, from the client's seeded RNG), and `gradient-variance`: in round 1 every
client also reports the squared gradient norm of each layer on one batch (one full backward);
the server ranks layers by mean minus standard deviation of those norms across clients --
large and consistent gradients first, edgetune's reading of the paper's rule that favours
layers with large gradients while penalising disagreement between clients -- and every later
client trains the first `budget` layers of that ranking. Written by hand: no library has it.
"""

from __future__ import annotations

import torch

from edgetune.federated.methods.weights import WeightMethod, sample_batch
from edgetune.federated.protocol import Message
from edgetune.federated.trainable import layer_of, num_layers

RANKING = "_ranking"  # control tensor in the state / downlink, not a weight block


class FedSelFT(WeightMethod):
    control_keys = (RANKING,)
    side_tensors = ("_layer_sq_norms",)  # gradient-variance probe, round 1

    def prepare_model(self, model):
        model = super().prepare_model(model)
        self.num_layers = num_layers(model)
        self.keys_of = {l: [k for k in self.blocks if layer_of(k) == l] for l in range(self.num_layers)}
        return model

    def layers_for(self, client_id: int, ranking: list[int] | None, rng: torch.Generator) -> list[int]:
        n, b = self.num_layers, min(self.cfg.selft.budget(client_id), self.num_layers)
        strategy = self.cfg.selft.strategy
        if strategy == "random":
            return sorted(torch.randperm(n, generator=rng)[:b].tolist())
        if strategy == "gradient-variance" and ranking is not None:
            return sorted(ranking[:b])
        if strategy == "bottom":
            return list(range(b))
        if strategy == "both":
            return sorted(set(range((b + 1) // 2)) | set(range(n - b // 2, n)))
        return list(range(n - b, n))  # top, and gradient-variance before the ranking exists

    # ----------------------------------------------------------------- protocol
    def down_keys(self, state):
        """Blocks that moved away from the pretrained weights (clients already hold those)."""
        return [k for k in self.blocks if not torch.equal(state[k], self.initial[k])]

    def client_update(self, model, down, data, rng):
        self.load(down.tensors)
        ranking = down.tensors[RANKING].tolist() if RANKING in down.tensors else None
        probe = None
        if self.cfg.selft.strategy == "gradient-variance" and ranking is None:
            probe = self.layer_gradient_norms(model, data, rng)
        layers = self.layers_for(data.client_id, ranking, rng)
        keys = [k for l in layers for k in self.keys_of[l]]
        loss = self.train_locally(model, [self.blocks[k] for k in keys], data, rng)
        tensors = {k: self.blocks[k].detach().clone() for k in keys}
        if probe is not None:
            tensors["_layer_sq_norms"] = probe
        return Message(tensors, {"num_samples": len(data), "loss": loss})

    def layer_gradient_norms(self, model, data, rng) -> torch.Tensor:
        """Squared gradient norm of each layer's weights on one local batch."""
        model.zero_grad(set_to_none=True)
        self.loss(model, *sample_batch(data, self.cfg.batch_size, rng)).backward()
        norms = torch.zeros(self.num_layers)
        for l, keys in self.keys_of.items():
            norms[l] = sum(float(self.blocks[k].grad.pow(2).sum()) for k in keys)
        model.zero_grad(set_to_none=True)
        return norms

    def aggregate(self, state, replies):
        probes = [r.tensors.pop("_layer_sq_norms") for r in replies if "_layer_sq_norms" in r.tensors]
        blocks = {k: state[k] for k in self.blocks}
        new = self.server.step(blocks, self.client_mean(blocks, replies))
        if RANKING in state:
            new[RANKING] = state[RANKING]
        elif probes:
            new[RANKING] = rank_layers(torch.stack(probes))
        return new

    def round_metrics(self, state):
        return {**super().round_metrics(state), "layers_moved": float(len({layer_of(k) for k in self.down_keys(state)} - {None}))}


def rank_layers(sq_norms: torch.Tensor) -> torch.Tensor:
    """(clients, layers) squared gradient norms -> layer indices, best first, by mean minus
    standard deviation across clients (one client: by mean)."""
    norms = sq_norms.sqrt()
    spread = norms.std(0) if len(norms) > 1 else torch.zeros(norms.shape[1])
    return torch.argsort(norms.mean(0) - spread, descending=True).to(torch.int16)
