"""Privacy accounting with Opacus's accountants (PRV or RDP), one account per party that adds noise.

An account is the mechanism's inputs, fixed for a run (noise multiplier sigma, sampling rate q, delta), plus the
number of noised steps taken so far. It is a plain dict on disk, so it lives where the party keeps its state (a
silo's state directory, the run directory) and survives resume and extension.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

from fedgen.core.errors import FedgenError

ACCOUNTANT_NAMES = {"prv": "Opacus PRVAccountant (Gopi et al. 2021)", "rdp": "Opacus RDPAccountant (Mironov 2017)"}


class PrivacyBudgetError(FedgenError):
    """The requested (epsilon, delta) cannot be met with the given inputs."""


def epsilon(accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """epsilon of `steps` compositions of the sampled Gaussian mechanism (sigma, q), at `delta`."""
    if steps == 0:
        return 0.0
    from opacus.accountants import create_accountant  # Opacus (seconds to import): only where DP is on

    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" hint for tiny budgets
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def solve_noise_multiplier(accountant: str, target_epsilon: float, delta: float, sample_rate: float,
                           steps: int) -> float:
    """The smallest sigma (to 0.01 in epsilon) whose `steps` steps at rate q stay within (target_epsilon, delta)."""
    from opacus.accountants.utils import get_noise_multiplier  # Opacus (seconds to import): only where DP is on

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=max(steps, 1), accountant=accountant,
                                              epsilon_tolerance=0.01))
    except ValueError as exc:
        raise PrivacyBudgetError(f"no noise multiplier reaches epsilon={target_epsilon} at delta={delta} over "
                                 f"{steps} steps at sampling rate {sample_rate:.4g}: {exc}") from None


@dataclass
class Account:
    """One party's record-level (or client-level) privacy bookkeeping."""

    accountant: str
    noise_multiplier: float
    sample_rate: float
    delta: float
    planned_steps: int  # the steps sigma was solved for (or, with a given sigma, the run's plan at its start)
    steps: int = 0
    target_epsilon: float | None = None

    def epsilon(self) -> float:
        return epsilon(self.accountant, self.noise_multiplier, self.sample_rate, self.steps, self.delta)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Account:
        return cls(**d)

    def report(self) -> dict:
        """What a party tells the coordinator (and the ledger shows): epsilon with every input it depends on."""
        return {"epsilon": self.epsilon(), "delta": self.delta, "accountant": self.accountant,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps,
                "planned_steps": self.planned_steps, "target_epsilon": self.target_epsilon}


def open_account(privacy, sample_rate: float, planned_steps: int, dataset_size: int | None) -> Account:
    """A new account from the `privacy` config: sigma given, or solved for the target over the planned steps.
    delta must be below 1/|D| (else "private" could mean publishing a record outright)."""
    if dataset_size is not None and privacy.delta >= 1 / dataset_size:
        raise PrivacyBudgetError(f"privacy.delta={privacy.delta:g} is not below 1/{dataset_size} (1/|D| of this "
                                 f"party): choose delta < {1 / dataset_size:.3g}")
    if privacy.noise_multiplier is not None:
        sigma = privacy.noise_multiplier
    else:
        sigma = solve_noise_multiplier(privacy.accountant, privacy.target_epsilon, privacy.delta, sample_rate,
                                       planned_steps)
    return Account(privacy.accountant, sigma, sample_rate, privacy.delta, planned_steps,
                   target_epsilon=privacy.target_epsilon)
