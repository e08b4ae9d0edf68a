"""Which silos take part in a round: a public function of (seed, round), independent of any data, so a silo
can plan its privacy budget over exactly the rounds it will be asked to train in."""

from __future__ import annotations

import numpy as np

from fedgen.core.seeding import derive_seed


def sample_silos(num_silos: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """K of N silos uniformly without replacement, a pure function of (seed, round)."""
    if not 1 <= per_round <= num_silos:
        raise ValueError(f"cannot sample {per_round} of {num_silos} clients")
    if per_round == num_silos:
        return list(range(num_silos))
    rng = np.random.default_rng(derive_seed(seed, "client-sampling", round_idx))
    return sorted(int(i) for i in rng.choice(num_silos, size=per_round, replace=False))
