"""Remedies for non-IID data inside one local update (algorithms/feddm/local_update.py `LocalUpdate.fit`).

- FedProx (Li et al. 2020): the local loss gets mu/2 |theta - theta_g|^2. Its gradient mu (theta - theta_g) is
  added to every step's gradient just before the optimiser's step (under DP-SGD after the clipping and the noise:
  it depends on no record, so it is post-processing).
- SCAFFOLD (Karimireddy et al. 2020), option II: each local step is followed by y <- y - lr (c - c_i), with c the
  server's control variate and c_i the client's own; after K steps the client's variate becomes
  c_i+ = c_i - c + (theta_g - y_K) / (K lr). With SGD as the local optimiser this is exactly the paper's step
  y <- y - lr (g - c_i + c). fedgen's local optimiser is Adam; the correction is then applied in the space of
  the optimiser's steps, and c_i+ is exactly the mean of the client's K Adam directions (the (K lr) of option II
  divides out the step size), so the drift correction compares like with like. The paper's option II, which
  assumes plain SGD, would otherwise estimate a gradient from Adam's normalised steps.

Both work on named parameters; a control variate is a state dict of the model's parameters (the float32 tensors
sent with the global weights).
"""

from __future__ import annotations

import torch
from torch import nn

from fedgen.core.records import State


class LocalRemedy:
    """Hooks around each local optimiser step; `finish` returns what the client sends back besides its weights."""

    def before_step(self) -> None:
        """Called with the step's (final) gradients in place, just before the optimiser's update."""

    def after_step(self) -> None:
        """Called right after the optimiser's update."""

    def finish(self, steps: int) -> dict[str, State]:
        return {}


class Proximal(LocalRemedy):
    """FedProx's proximal term mu/2 |theta - theta_g|^2, added through its gradient."""

    def __init__(self, model: nn.Module, global_state: State, mu: float):
        self.mu = mu
        self.pairs = [(p, global_state[n].to(p.device)) for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def before_step(self) -> None:
        if self.mu == 0:
            return
        for p, anchor in self.pairs:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p - anchor, alpha=self.mu)


class ScaffoldCorrection(LocalRemedy):
    """SCAFFOLD option II at the client: the correction after each step and the client's new control variate."""

    def __init__(self, model: nn.Module, global_state: State, lr: float, server_control: State,
                 client_control: State | None):
        self.lr = lr
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = dict(model.named_parameters())
        self.start = {n: global_state[n].to(self.params[n].device) for n in self.names}
        self.server = {n: server_control[n].to(self.params[n].device) for n in self.names}
        self.client = ({n: client_control[n].to(self.params[n].device) for n in self.names}
                       if client_control is not None else {n: torch.zeros_like(self.server[n]) for n in self.names})
        self.shift = {n: self.server[n] - self.client[n] for n in self.names}  # c - c_i

    @torch.no_grad()
    def after_step(self) -> None:
        for n in self.names:
            self.params[n].add_(self.shift[n], alpha=-self.lr)

    @torch.no_grad()
    def finish(self, steps: int) -> dict[str, State]:
        """{"control": c_i+ (kept by the client), "control_delta": c_i+ - c_i (sent to the server)}."""
        if steps < 1:
            raise ValueError("SCAFFOLD needs at least one local step to update the control variate")
        new = {n: self.client[n] - self.server[n] + (self.start[n] - self.params[n]) / (steps * self.lr)
               for n in self.names}
        return {"control": {n: v.detach().clone() for n, v in new.items()},
                "control_delta": {n: (new[n] - self.client[n]).detach().clone() for n in self.names}}


def scaffold_server_update(control: State, deltas: dict[int, State], sizes: dict[int, int]) -> State:
    """The server's variate after a round: c + sum over the round's clients of p_i * delta c_i, with
    p_i = |D_i| / sum_j |D_j| over all N clients (`sizes`). It keeps c equal to sum_i p_i c_i over every client,
    the variates of those not sampled being unchanged. With equal data sizes p_i = 1/N: the paper's
    c + (1/N) sum_{i in S} delta c_i. (fedgen weights clients by data size everywhere, so that the federated
    objective is the loss over the union of the data, the centralized baseline's.)"""
    total = float(sum(sizes.values()))
    out = {}
    for name, value in control.items():
        acc = value.to(torch.float64).clone()
        for silo in sorted(deltas):
            acc += deltas[silo][name].to(torch.float64) * (sizes[silo] / total)
        out[name] = acc.to(value.dtype)
    return out
