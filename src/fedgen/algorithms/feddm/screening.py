"""The server's work in FedDM (Algorithm 1): pick K of N clients, screen what comes back, average the usable
updates weighted by their data sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedgen.algorithms.feddm.fedavg import fedavg
from fedgen.core.records import Failure, Reply, State
from fedgen.federation.selection import sample_silos


@dataclass
class Screened:
    """The round's updates: accepted (silo -> (local state, number of examples)) and rejected (silo -> why)."""

    accepted: dict[int, tuple[State, int]] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)


def _distance(a: State, b: State) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point()))


def _bad_control(delta: State | None, ref: State) -> str | None:
    """Why a SCAFFOLD control-variate change cannot be used, or None."""
    if delta is None:
        return "reply holds no control-variate change (SCAFFOLD)"
    want = {k for k, v in ref.items() if v.is_floating_point()}
    if delta.keys() != want or any(delta[k].shape != ref[k].shape for k in want):
        return "control-variate change has other keys or shapes than the global model"
    if bad := [k for k, v in delta.items() if not torch.isfinite(v).all()]:
        return f"control-variate change is not finite (NaN/Inf in {bad[0]})"
    return None


class FedAvgServer:
    def __init__(self, num_clients: int, per_round: int, seed: int, global_state: State,
                 max_update_norm_ratio: float = 10.0, expects_control: bool = False):
        self.num_clients = num_clients
        self.per_round = per_round
        self.seed = seed
        self.global_state = global_state
        self.max_update_norm_ratio = max_update_norm_ratio
        self.expects_control = expects_control  # SCAFFOLD: every reply carries its control-variate change

    def select(self, round_idx: int) -> list[int]:
        return sample_silos(self.num_clients, self.per_round, self.seed, round_idx)

    def screen(self, selected: list[int], replies: dict[int, Reply | Failure]) -> Screened:
        """Accept the updates that can be averaged; reject (and say why) a missing reply, a failure, an update that
        is not finite, has other keys or shapes than the global model, or lies far outside the round's others."""
        out = Screened()
        ref = self.global_state
        for silo in selected:
            reply = replies.get(silo)
            if reply is None:
                out.rejected[silo] = "no reply"
            elif isinstance(reply, Failure):
                out.rejected[silo] = reply.reason
            elif "error" in reply.config:
                out.rejected[silo] = str(reply.config["error"])
            elif (state := reply.arrays.get("local")) is None:
                out.rejected[silo] = "reply holds no weights"
            elif state.keys() != ref.keys():
                diff = sorted(state.keys() ^ ref.keys())
                out.rejected[silo] = f"update has other keys than the global model ({', '.join(diff[:3])}...)"
            elif bad := [k for k in ref if state[k].shape != ref[k].shape]:
                out.rejected[silo] = (f"update has other shapes than the global model ({bad[0]}: "
                                      f"{tuple(state[bad[0]].shape)} vs {tuple(ref[bad[0]].shape)})")
            elif bad := [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
                out.rejected[silo] = f"update is not finite (NaN/Inf in {bad[0]})"
            elif self.expects_control and (why := _bad_control(reply.arrays.get("control_delta"), ref)):
                out.rejected[silo] = why
            else:
                out.accepted[silo] = (state, int(reply.config["num_examples"]))
        if len(out.accepted) >= 3:
            norms = {s: _distance(st, ref) for s, (st, _) in out.accepted.items()}
            for silo, norm in norms.items():
                others = sorted(v for s, v in norms.items() if s != silo)
                median = others[len(others) // 2] if len(others) % 2 else sum(others[len(others) // 2 - 1:][:2]) / 2
                if median > 0 and norm > self.max_update_norm_ratio * median:
                    out.rejected[silo] = (f"update norm {norm:.4g} is {norm / median:.1f}x the median of the round's "
                                          f"others ({median:.4g}; limit fl.max_update_norm_ratio="
                                          f"{self.max_update_norm_ratio:g})")
            for silo in out.rejected:
                out.accepted.pop(silo, None)
        return out

    def aggregate(self, accepted: dict[int, tuple[State, int]]) -> State:
        """sum_i |D_i| / sum_j |D_j| theta_i over the accepted updates, in silo order (the server optimiser,
        algorithms/feddm/server_opt.py, then steps the global weights towards it)."""
        ids = sorted(accepted)
        return fedavg([accepted[i][0] for i in ids], [accepted[i][1] for i in ids])
