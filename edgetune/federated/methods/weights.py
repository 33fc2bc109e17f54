"""What every weight-exchanging (PEFT / full) method shares: a client loads the global blocks it
was sent, trains its trainable set by backprop for local_steps (a fresh AdamW, or plain SGD with
finetune.client_optimizer), and uploads the new values of the blocks it trained (with
finetune.proximal_mu, FedProx's proximal term on its loss; with finetune.scaffold, each step
corrected by SCAFFOLD's control variates, scaffold.py); the server averages them weighted by
sample counts (Flower's `aggregate`; or folds them by a robust rule, finetune.aggregation) and
steps its optimizer (server_opt.py: FedAvg, FedAvgM, FedAdam).

The global state is a dict of named blocks (trainable parameters, or parts of one). By default
every block goes both ways (FedIT, prompt tuning, BitFit, full fine-tuning); FedSelFT and
FedPepTAO narrow what goes down (`down_keys`) and what a client trains (their client_update).

In simulation all clients share one model object; a client starts from the initial blocks
overwritten by what it was sent (`load`), as a device holding the pretrained model would.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from edgetune.federated.aggregation import mean_per_key, robust_blocks
from edgetune.federated.engine import ClientData
from edgetune.federated.methods.base import FederatedMethod
from edgetune.federated.protocol import Message
from edgetune.federated.scaffold import PREFIX as CORRECTION
from edgetune.federated.server_opt import ServerOptimizer
from edgetune.federated.trainable import prepare_trainable, trainable_blocks


def sample_batch(data: ClientData, batch_size: int, rng: torch.Generator):
    idx = torch.randint(len(data), (batch_size,), generator=rng).tolist()
    return [data.prompts[i] for i in idx], [data.targets[i] for i in idx]


class WeightMethod(FederatedMethod):
    control_keys: tuple[str, ...] = ()  # small non-weight tensors of the state that go down too
    side_tensors: tuple[str, ...] = ()  # small 1-D float tensors a reply may add (e.g. layer scores)
    partial_replies = False  # True: a client sends only the blocks it trained (registry.MethodSpec)
    scaffold = None  # scaffold.ControlVariates when finetune.scaffold is on (set by setup.prepare)

    def prepare_model(self, model):
        model = prepare_trainable(model, self.cfg.trainable_set, self.cfg, self.tok)
        self.blocks = trainable_blocks(model)
        self.initial = {k: p.detach().clone() for k, p in self.blocks.items()}
        self.server = ServerOptimizer(self.cfg.server, self.cfg.server_optimizer)
        return model

    # ----------------------------------------------------------------- which blocks travel
    def down_keys(self, state) -> list[str]:
        return list(state)

    # ----------------------------------------------------------------- protocol
    def init_state(self, model):
        return {k: v.clone() for k, v in self.initial.items()}

    def downlink(self, state):
        control = {k: state[k] for k in self.control_keys if k in state}
        return Message({**{k: state[k] for k in self.down_keys(state)}, **control})

    def personal(self, client_id):
        return self.scaffold.correction(client_id, self.blocks) if self.scaffold else None

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, p in self.blocks.items():
            p.copy_(tensors.get(key, self.initial[key]))

    def expected_reply(self, down):
        blocks = {k: (tuple(p.shape), p.dtype) for k, p in self.blocks.items()}
        return {**blocks, **{k: (None, None) for k in self.side_tensors}}

    def required_reply(self, down):
        return () if self.partial_replies else tuple(self.blocks)

    def client_update(self, model, down, data, rng):
        self.load(down.tensors)
        correction = None
        if self.cfg.scaffold:  # c - c_i per block, moved to the block's device once per round
            correction = [down.tensors[CORRECTION + k].to(p.device, p.dtype) for k, p in self.blocks.items()]
        loss = self.train_locally(model, list(self.blocks.values()), data, rng, correction)
        return Message({k: p.detach().clone() for k, p in self.blocks.items()},
                       {"num_samples": len(data), "loss": loss})

    def train_locally(self, model, params: list[torch.Tensor], data: ClientData, rng,
                      correction: list[torch.Tensor] | None = None) -> float:
        """local_steps of the client optimizer on `params` only (the rest frozen), each step
        followed by SCAFFOLD's shift -lr * (c - c_i) when `correction` (one tensor per param)
        is given; returns the mean task loss (without the proximal term)."""
        chosen = {id(p) for p in params}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
        for p in frozen:
            p.requires_grad_(False)
        model.train()
        opt = self.client_optimizer(params)
        mixed = self.precision if self.precision and self.precision.enabled else None  # model.dtype
        anchor = [p.detach().clone() for p in params] if self.cfg.proximal_mu else None
        losses = []
        try:
            for _ in range(self.cfg.local_steps):
                with mixed.autocast() if mixed else nullcontext():
                    loss = self.loss(model, *sample_batch(data, self.cfg.batch_size, rng))
                total = loss + self.proximal_term(params, anchor) if anchor else loss
                opt.zero_grad(set_to_none=True)
                if mixed:  # bf16 / fp16 autocast; fp16 with a GradScaler
                    mixed.step(total, opt)
                else:
                    total.backward()
                    opt.step()
                if correction is not None:
                    self.correct(params, correction)
                losses.append(loss.item())
        finally:  # also when the client fails: the next one finds the model as it was
            for p in frozen:
                p.requires_grad_(True)
            model.eval()
        return sum(losses) / len(losses)

    def client_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """A fresh optimizer for one client's round (finetune.client_optimizer). AdamW's first
        steps move every coordinate by about lr whatever the gradient's size; plain SGD, the local
        solver of FedAvg (McMahan et al., AISTATS 2017), moves in proportion to the gradient, so
        rows the model already answers well barely pull it."""
        if self.cfg.client_optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.client_lr, weight_decay=self.cfg.weight_decay)
        return torch.optim.AdamW(params, lr=self.cfg.client_lr, weight_decay=self.cfg.weight_decay)

    @torch.no_grad()
    def correct(self, params: list[torch.Tensor], correction: list[torch.Tensor]) -> None:
        """SCAFFOLD's control-variate step y <- y - lr * (c - c_i) (scaffold.py); `correction`
        is on the params' device and dtype."""
        for p, c in zip(params, correction):
            p.sub_(c, alpha=self.cfg.client_lr)

    def proximal_term(self, params: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
        """FedProx's mu/2 * ||w - w_global||^2 over the trained tensors, w_global being their
        values when local training began (Li et al., "Federated Optimization in Heterogeneous
        Networks", MLSys 2020): it keeps a client on skewed data near the global model.
        Written here because the term lives in the client's loss: Flower's FedProx strategy
        only sends mu, and its clients add the term themselves."""
        drift = sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(params, anchor))
        return 0.5 * self.cfg.proximal_mu * drift

    def client_mean(self, state, replies) -> dict[str, torch.Tensor]:
        """The blocks the server optimizer steps towards: the sample-weighted mean, a robust
        rule's fold (finetune.aggregation, edgetune/federated/aggregation.py), or with DP the
        global blocks plus the noisy mean of the clipped updates (privacy.py)."""
        if self.privacy:
            updates = [{k: r.tensors[k] - state[k] for k in r.tensors if k in self.blocks} for r in replies]
            noisy = self.privacy.noisy_mean(updates, {k: state[k] for k in self.blocks})
            return {k: state[k] + d for k, d in noisy.items()}
        if self.cfg.aggregation.rule == "mean":
            return mean_per_key(replies)
        return robust_blocks(self.cfg.aggregation, state, replies)

    def aggregate(self, state, replies):
        new = self.server.step(state, self.client_mean(state, replies))
        if self.scaffold:
            self.scaffold.update(state, replies)
        return new

    def summand(self, reply, down):
        """Secure aggregation sums updates, block by block in name order: y_i - x in float64."""
        for k in sorted(self.blocks):  # a CUDA client's blocks come to the CPU here
            yield reply.tensors[k].detach().to("cpu", torch.float64, copy=True).sub_(down.tensors[k].cpu().double())

    def summand_size(self, down):
        return sum(p.numel() for p in self.blocks.values())

    def from_mean(self, mean, down, meta):
        out, at = {}, 0
        for k in sorted(self.blocks):
            x = down.tensors[k]
            out[k] = (x.double() + mean[at:at + x.numel()].reshape(x.shape)).to(x.dtype)
            at += x.numel()
        return Message(out, meta)

    def checkpoint_state(self):
        saved = {**super().checkpoint_state(), "server": self.server.state_dict()}
        return {**saved, "scaffold": self.scaffold.state_dict()} if self.scaffold else saved

    def restore(self, model, state, saved):
        super().restore(model, state, saved)
        self.server.load_state_dict({k: state[k] for k in self.blocks}, saved["server"])
        if self.scaffold:
            self.scaffold.load_state_dict(saved["scaffold"])

    def apply_global(self, model, state):
        self.load(state)
