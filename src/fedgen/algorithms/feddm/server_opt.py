"""Server optimisers (FedOpt, Reddi et al. 2021): the round's aggregate becomes a pseudo-gradient
g = theta_g - sum_i w_i theta_i, and a torch optimiser steps the global weights along it with the server
learning rate. fedavg (and fedprox, scaffold) is SGD without momentum: at server lr 1 the step lands exactly on
the weighted average. fedavgm is SGD with momentum (v <- beta v + g, theta <- theta - lr v), fedadam
`torch.optim.Adam`, fedadagrad `torch.optim.Adagrad`, fedyogi pytorch-optimizer's `Yogi`, each with eps = tau.

Adam and Yogi here correct their moments' bias (as Flower's FedAdam/FedYogi do; Reddi et al.'s Algorithm 2 does
not), so the first rounds' steps are not shrunk by (1 - beta); Adagrad's and Yogi's accumulators start at tau^2
(Reddi et al.: v_{-1} >= tau^2). The adaptive ones normalise each coordinate by sqrt(v): no server lr makes them
plain averaging.

The optimiser keeps float64 master weights, so that theta - 1 * (theta - avg) is the float32 average exactly and
the optimiser's own arithmetic is not limited by the model's float32; the global model is their float32 copy.
"""

from __future__ import annotations

import torch

from fedgen.config import FLConfig
from fedgen.config.choices import ADAPTIVE_STRATEGIES
from fedgen.core.records import State


def make_optimizer(fl: FLConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    lr, tau = fl.server_learning_rate, fl.server_tau
    if fl.strategy == "fedadam":
        return torch.optim.Adam(params, lr=lr, betas=fl.server_betas, eps=tau)
    if fl.strategy == "fedyogi":
        from pytorch_optimizer import Yogi  # pytorch-optimizer loads ~100 optimisers on import: FedYogi only

        return Yogi(params, lr=lr, betas=fl.server_betas, eps=tau, initial_accumulator=tau**2, foreach=False)
    if fl.strategy == "fedadagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=tau, initial_accumulator_value=tau**2)
    momentum = fl.server_momentum if fl.strategy == "fedavgm" else 0.0
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


class ServerOptimizer:
    """Steps the global weights from an aggregate. Tensors that are not floating point (integer buffers) are
    taken from the aggregate as they are."""

    def __init__(self, fl: FLConfig, global_state: State):
        self.fl = fl
        self.dtypes = {k: v.dtype for k, v in global_state.items()}
        self.master = {k: torch.nn.Parameter(v.detach().to(torch.float64).clone())
                       for k, v in global_state.items() if v.is_floating_point()}
        self.optimizer = make_optimizer(fl, list(self.master.values()))

    @property
    def plain_average(self) -> bool:
        """SGD at lr 1 without momentum: stateless, the global weights are the aggregate (nothing to checkpoint)."""
        return (self.fl.strategy not in ADAPTIVE_STRATEGIES and self.fl.strategy != "fedavgm"
                and self.fl.server_learning_rate == 1.0)

    def step(self, aggregate: State) -> State:
        """theta_g <- optimizer step on g = theta_g - aggregate; returns the new global state."""
        for key, p in self.master.items():
            p.grad = p.detach() - aggregate[key].to(torch.float64)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: (self.master[k].detach().to(self.dtypes[k]).clone() if k in self.master else aggregate[k])
                for k in aggregate}

    def state_dict(self) -> dict | None:
        if self.plain_average:
            return None
        return {"master": {k: p.detach().clone() for k, p in self.master.items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, saved: dict | None, global_state: State) -> None:
        """Restore a checkpointed server optimiser; without one (a run saved before it had one), start it from
        the global weights."""
        with torch.no_grad():
            for key, p in self.master.items():
                p.copy_(saved["master"][key] if saved else global_state[key].to(torch.float64))
        if saved:
            self.optimizer.load_state_dict(saved["optimizer"])
