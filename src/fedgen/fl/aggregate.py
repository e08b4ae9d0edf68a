"""Server side of FedAvg: client selection and weighted averaging of model states."""

from __future__ import annotations

import numpy as np
import torch

from fedgen.seeding import derive_seed

State = dict[str, torch.Tensor]


def sample_clients(num_clients: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """K of N clients uniformly without replacement, a pure function of (seed, round)."""
    if not 1 <= per_round <= num_clients:
        raise ValueError(f"cannot sample {per_round} of {num_clients} clients")
    if per_round == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, "client-sampling", round_idx))
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


def fedavg(states: list[State], weights: list[float]) -> State:
    """sum_i w_i / sum_j w_j * theta_i for every tensor of the state (parameters and buffers).

    Accumulates in float64 so the result does not depend on the order of summation more than it must;
    integer buffers (e.g. BatchNorm's num_batches_tracked) are rounded back to their dtype.
    """
    if not states:
        raise ValueError("fedavg needs at least one client state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights must sum to a positive number")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError("client states have different keys")
    out: State = {}
    for key in keys:
        acc = sum(s[key].to(torch.float64) * (w / total) for s, w in zip(states, weights, strict=True))
        ref = states[0][key]
        out[key] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
    return out


def state_nbytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
