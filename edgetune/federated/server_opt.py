"""Server optimizers for weight-exchanging methods: FedOpt (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021). The server treats delta = global - (sample-weighted client mean) as a
gradient and steps a torch optimizer on it:

    fedavg   global <- mean                               (FedAvg, McMahan et al. 2017)
    fedavgm  v <- m v + delta; global <- global - lr v     (FedAvgM, Hsu et al. 2019): torch SGD
    fedadam  Adam on delta with eps = tau                  (FedAdam): torch Adam

The update math is torch.optim's; edgetune only feeds it the pseudo-gradient. One deviation:
torch's Adam applies bias correction, Reddi et al.'s FedAdam does not. A block no client sent
this round gets no gradient (grad None), so torch leaves it and its moments untouched.
"""

from __future__ import annotations

import torch

from edgetune.config import ServerParams


class ServerOptimizer:
    def __init__(self, cfg: ServerParams, name: str):
        self.cfg, self.name = cfg, name
        self.params: dict[str, torch.Tensor] = {}
        self.opt: torch.optim.Optimizer | None = None

    def _optimizer(self, state: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
        if self.opt is None:
            self.params = {k: v.detach().clone().float() for k, v in state.items()}
            tensors = list(self.params.values())
            if self.name == "fedavgm":
                self.opt = torch.optim.SGD(tensors, lr=self.cfg.lr, momentum=self.cfg.momentum)
            else:
                self.opt = torch.optim.Adam(tensors, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps)
        return self.opt

    def state_dict(self) -> dict:
        """The optimizer's moments (none yet, or fedavg: empty), for resume."""
        return {} if self.opt is None else self.opt.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], saved: dict) -> None:
        if saved:
            self._optimizer(state).load_state_dict(saved)

    @torch.no_grad()
    def step(self, state: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The next global state from the current one and this round's client mean (which may
        cover only some blocks)."""
        if self.name == "fedavg":
            return {**state, **mean}
        opt = self._optimizer(state)
        for key, p in self.params.items():
            p.copy_(state[key])
            p.grad = (state[key] - mean[key]).float() if key in mean else None
        opt.step()
        return {k: p.detach().clone().to(state[k].dtype) for k, p in self.params.items()}
