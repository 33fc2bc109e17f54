"""SCAFFOLD's control variates (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML 2020), for the weight-exchanging methods (finetune.scaffold).

A server control variate c estimates the clients' mean update direction, and client i's c_i its
own. Every local step is corrected by c - c_i, so a client on skewed data moves along the
federation's direction rather than its own (the client drift that label skew causes):

    after each optimizer step      y <- y - lr * (c - c_i)             (weights.py, train_locally)
    after the round, option II     c_i+ = c_i - c + (x - y_i) / (K lr)
                                   c    <- c + (1/N) * sum over replies of (c_i+ - c_i)

x is the global state the round began from, y_i client i's reply, K = finetune.local_steps,
lr = the client lr, N = finetune's number of clients. With plain SGD (finetune.client_optimizer
sgd) shifting the weights after the step equals the paper's corrected gradient step; with AdamW
the shift is in the same units as the step (lr times a direction), as OpenFedLLM does it.

Where the state lives: the paper keeps c_i on the client, which uploads c_i+ - c_i. Every term of
c_i+ is a value the server already holds (c_i, c, x, and the reply y_i), so edgetune's server
keeps each c_i and computes c_i+ itself: clients stay stateless (a Flower SuperNode keeps
nothing; resume restores every c_i exactly) and upload only their blocks. Each sampled client
receives, beside the broadcast, its correction c - c_i (engine: a method's `personal` message),
so the download doubles as in the paper and the upload does not. The server holds one set of
blocks per client that has taken part: fine for adapters, N model copies for fedfull.

Written by hand: Flower has no SCAFFOLD strategy, and peft / trl have no federated state.
"""

from __future__ import annotations

import torch

from edgetune.federated.protocol import Message

PREFIX = "scaffold."  # personal tensors: the client's correction c - c_i, one per block


class ControlVariates:
    def __init__(self, num_clients: int, local_steps: int, lr: float):
        self.num_clients, self.local_steps, self.lr = num_clients, local_steps, lr
        self.server: dict[str, torch.Tensor] = {}  # c, float32; empty = zero
        self.clients: dict[int, dict[str, torch.Tensor]] = {}  # c_i of clients that took part

    def correction(self, client_id: int, blocks: dict[str, torch.Tensor]) -> Message:
        """c - c_i for every block, in the block's dtype (what the client receives)."""
        own = self.clients.get(client_id, {})
        out = {}
        for key, p in blocks.items():
            c = self.server.get(key, torch.zeros(p.shape))
            out[PREFIX + key] = (c - own.get(key, torch.zeros(p.shape))).to(p.dtype)
        return Message(out)

    @torch.no_grad()
    def update(self, start: dict[str, torch.Tensor], replies: list[Message]) -> None:
        """Option II of the paper: each replying client's c_i+ from the round's start x and its
        reply y_i; then c moves by the sum of the changes over N. A reply names its client in
        meta client_id (stamped by the engine, not sent by the client)."""
        scale = 1.0 / (self.local_steps * self.lr)
        changes = []
        for reply in replies:
            cid = int(reply.meta["client_id"])
            own = self.clients.get(cid, {})
            new = {}
            for key, y in reply.tensors.items():
                if key not in start:
                    continue
                x = start[key].detach().float().cpu()
                c = self.server.get(key, torch.zeros_like(x))
                c_i = own.get(key, torch.zeros_like(x))
                new[key] = c_i - c + (x - y.float()) * scale
            changes.append({k: v - own.get(k, torch.zeros_like(v)) for k, v in new.items()})
            self.clients[cid] = new
        for change in changes:
            for key, d in change.items():
                self.server[key] = self.server.get(key, torch.zeros_like(d)) + d / self.num_clients

    def state_dict(self) -> dict:
        return {"server": self.server, "clients": self.clients}

    def load_state_dict(self, saved: dict) -> None:
        self.server = dict(saved["server"])
        self.clients = {int(k): dict(v) for k, v in saved["clients"].items()}
