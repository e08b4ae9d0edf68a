"""The server's work in FedDM (Algorithm 1): pick K of N clients, average what comes back."""

from __future__ import annotations

from fedgen.fl.aggregate import State, fedavg, sample_clients, state_nbytes
from fedgen.fl.client import FitResult


class FedAvgServer:
    def __init__(self, num_clients: int, per_round: int, seed: int, global_state: State):
        self.num_clients = num_clients
        self.per_round = per_round
        self.seed = seed
        self.global_state = global_state

    def select(self, round_idx: int) -> list[int]:
        return sample_clients(self.num_clients, self.per_round, self.seed, round_idx)

    def aggregate(self, results: dict[int, FitResult]) -> State:
        """theta_g <- sum_i |D_i| / sum_j |D_j| theta_i over the clients that returned."""
        ids = sorted(results)
        self.global_state = fedavg([results[i].state for i in ids], [results[i].num_examples for i in ids])
        return self.global_state

    @property
    def model_bytes(self) -> int:
        return state_nbytes(self.global_state)
