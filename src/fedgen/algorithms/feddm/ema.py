"""The server's exponential moving average of the global weights (what FedDM samples and evaluates with)."""

from __future__ import annotations

import torch
from diffusers.training_utils import EMAModel

from fedgen.core.records import State


class WeightAverage:
    """The EMA of the global weights, kept by the server and updated after each aggregation: diffusers'
    `EMAModel` (decay min(`decay`, (1 + n) / (10 + n)) at update n, so the first rounds are not stuck near the
    initial weights)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if len(model.state_dict()) != len(list(model.parameters())):
            raise ValueError("WeightAverage averages parameters: a model with buffers needs them carried too")
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.ema = EMAModel(model.parameters(), decay=decay)

    def update(self, state: State) -> None:
        self.model.load_state_dict(state)  # EMAModel averages parameters that require grad (else it copies)
        self.ema.step(self.model.parameters())

    def state(self) -> tuple[State, int]:
        """(the averaged weights as a model state, the number of updates)."""
        return ({n: p.detach().clone() for n, p in zip(self.names, self.ema.shadow_params, strict=True)},
                self.ema.optimization_step)

    def restore(self, saved: tuple[State, int] | None) -> None:
        if saved is None:  # a run from before EMA existed: start averaging from the current weights
            return
        state, updates = saved
        self.ema.load_state_dict({"optimization_step": updates, "shadow_params": [state[n] for n in self.names]})
