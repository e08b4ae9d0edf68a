"""FedAvg's aggregation: the data-size-weighted average of the silos' model states."""

from __future__ import annotations

import torch

from fedgen.core.records import State


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

