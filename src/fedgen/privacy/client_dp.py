"""Client-level DP-FedAvg (McMahan et al. 2018): each client's update is clipped to C where it is computed, the
server averages the clipped updates with uniform weights over the K clients it sampled and adds Gaussian noise of
std sigma*C/K per coordinate. One round is one sampled Gaussian mechanism on the client population, sampling rate
K/N (fixed-size sampling analysed as Poisson, as in that paper; exact when K = N).
"""

from __future__ import annotations

import math

import torch

from fedgen.core.records import State


def _floating(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def update_norm(local: State, global_state: State) -> float:
    return math.sqrt(sum(float(((local[k].double() - global_state[k].double()) ** 2).sum())
                         for k in _floating(global_state)))


def clip_update(local: State, global_state: State, max_norm: float) -> tuple[State, float]:
    """(theta_g + Delta * min(1, C/||Delta||), ||Delta||): the client's update, clipped to norm C."""
    norm = update_norm(local, global_state)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    out = dict(local)
    for k in _floating(global_state):
        g = global_state[k].double()
        out[k] = (g + (local[k].double() - g) * scale).to(local[k].dtype)
    return out, norm


def noised_mean_update(global_state: State, locals_: list[State], per_round: int, noise_multiplier: float,
                       max_norm: float, gen: torch.Generator) -> State:
    """theta_g + (sum_i Delta_i + N(0, (sigma C)^2 I)) / K over the (clipped) updates that arrived. The divisor is
    the K the server sampled, not the number that answered: the sum's sensitivity is C either way."""
    out = dict(global_state)
    for k in _floating(global_state):
        g = global_state[k].double()
        total = sum(s[k].double() - g for s in locals_)
        noise = torch.randn(g.shape, generator=gen, dtype=torch.float64) * (noise_multiplier * max_norm)
        out[k] = (g + (total + noise.to(g.device)) / per_round).to(global_state[k].dtype)
    return out


def noise_to_signal(noise_multiplier: float, max_norm: float, per_round: int, num_params: int) -> float:
    """E||noise|| / K over the largest possible mean update C: sigma*sqrt(d)/K. Above 1 the noise outweighs any
    update the clients can agree on."""
    return noise_multiplier * math.sqrt(num_params) / per_round
