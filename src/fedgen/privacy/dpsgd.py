"""Record-level DP-SGD for one party's local training, on Opacus 1.6 (per-sample gradients, clipping, noise).

DP-SGD wraps a local update the way Opacus's `make_private` does, instead of being threaded through it:
`PrivateSteps` takes the model and the torch optimizer of one local update and gives back the two things a
local loop does with them, `batches` and `step`, with the same signatures as the plain loop's
(algorithms/feddm/local_update.PlainSteps). Inside: Poisson batches (every record in with probability q,
independently, from the silo's secret generator: the subsampling the accountant's amplification assumes), a
GradSampleModule for per-record gradients, a DPOptimizer for clipping and noise, and the privacy account's step
count advanced by the optimizer's step hook (as Opacus's PrivacyEngine advances its accountant), so no caller
counts steps by hand.

The caller computes one loss per row; a record may have several rows (noise multiplicity, DPDM: K noise draws of
the same image), whose gradients are averaged before clipping, so the privacy cost is that of one row per
record. Upstream Opacus does not have this: the per-row gradients Opacus computes are summed per record here,
between backward and the optimizer's clip-and-noise step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fedgen.core.errors import FedgenError
from fedgen.privacy.accountant import Account


class PrivacyModelError(FedgenError):
    """Opacus cannot compute per-sample gradients for a layer of the model."""


def poisson_plan(dataset_size: int, batch_size: int) -> tuple[float, int]:
    """(sampling rate q = batch/|D|, steps per epoch = round(|D|/batch), at least 1) of Poisson-sampled DP-SGD."""
    q = min(1.0, batch_size / dataset_size)
    return q, max(1, round(1 / q))


def poisson_batch(dataset_size: int, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of one Poisson sample: each record independently with probability `rate` (may be empty)."""
    return torch.nonzero(torch.rand(dataset_size, generator=gen) < rate).flatten()


def check_model(model: nn.Module) -> None:
    """Refuse, naming the layers, a model Opacus cannot train privately (BatchNorm, ...). Opacus's own
    `ModuleValidator.validate` runs the same per-type validators but does not say which layer failed."""
    from opacus.validators import ModuleValidator  # Opacus (seconds to import): only where DP is on

    problems = []
    for name, module in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None and any(p.requires_grad for p in module.parameters(recurse=False)):
            problems += [f"  {name or '(the model)'} ({type(module).__name__}): {str(e).split('. ')[0]}"
                         for e in validator(module)]
    if problems:
        raise PrivacyModelError("Opacus cannot train this model with DP-SGD:\n" + "\n".join(problems))


class PrivateSteps:
    """Per-record clipping to `max_grad_norm` and Gaussian noise of std `noise_multiplier * max_grad_norm` on the
    sum, divided by the expected batch size (Opacus's DPOptimizer), for `optimizer` over `model`'s parameters.
    `account`, when given, has its `steps` advanced by one per optimiser step (the step hook); `before_step` runs
    after clipping and noise, just before the update (FedProx's data-free term: post-processing)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, noise_generator: torch.Generator,
                 rows_per_record: int = 1, account: Account | None = None,
                 before_step: Callable[[], None] | None = None):
        from opacus import GradSampleModule  # Opacus (seconds to import): only where DP is on
        from opacus.optimizers import DPOptimizer

        check_model(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # functorch (vmap over the per-sample loss), not Opacus's per-layer hooks: with the hooks, the
                # per-sample gradients of the ResNet after the attention in diffusers' U-Net mid-block come out zero
                # (tests/test_privacy.py compares every record's gradient with plain autograd)
                self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True,
                                               force_functorch=True)
        except NotImplementedError as exc:
            raise PrivacyModelError(f"Opacus cannot compute per-sample gradients for this model: {exc}") from None
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                     expected_batch_size=expected_batch_size, loss_reduction="mean",
                                     generator=noise_generator)
        self.optimizer.attach_step_hook(self._after_noise)
        self.account, self.before_step = account, before_step
        self.rows = rows_per_record
        self.params = [p for p in model.parameters() if p.requires_grad]

    def use(self, account: Account, noise_generator: torch.Generator) -> None:
        """Take the next steps under `account` (its sigma, its step count) with noise from `noise_generator`."""
        self.account = account
        self.optimizer.noise_multiplier = account.noise_multiplier
        self.optimizer.generator = noise_generator

    def _after_noise(self, _optimizer) -> None:
        if self.account is not None:
            self.account.steps += 1
        if self.before_step is not None:
            self.before_step()

    def batches(self, dataset_size: int, batch_size: int, epochs: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
        """Index batches of `epochs` epochs: round(|D|/batch) Poisson samples per epoch at q = batch/|D|."""
        q, per_epoch = poisson_plan(dataset_size, batch_size)
        for _ in range(epochs * per_epoch):
            yield poisson_batch(dataset_size, q, gen)

    def step(self, row_losses: torch.Tensor, records: int) -> None:
        """One DP step from the rows' losses (`records` records of equal row counts, rows of a record adjacent);
        `records == 0` (an empty Poisson sample) is a noise-only step."""
        rows_per_record = len(row_losses) // records if records else 0
        self.optimizer.zero_grad(set_to_none=True)
        if records == 0:  # an empty Poisson sample: the step still happens, noise only
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Opacus: "CPU Autocast only supports bfloat16" from functorch
                (row_losses.sum() / rows_per_record).backward()
            if rows_per_record > 1:
                for p in self.params:
                    p.grad_sample = p.grad_sample.view(records, rows_per_record, *p.shape).sum(1)
        self.optimizer.step()

    def per_record_norms(self) -> torch.Tensor:
        """Norms of the per-record gradients of the last step before clipping (for tests and diagnostics)."""
        return torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in self.params], 1).norm(dim=1)

    def close(self) -> None:
        """Remove Opacus's hooks and attributes: the model is a plain module again."""
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()


@dataclass
class DPSGD:
    """What one DP local update needs from its silo: the silo's `account` (sigma, q; its steps advance as the
    update takes them), the clip norm, rows per record (noise multiplicity) and the secret generator that draws the
    batches and the noise."""

    account: Account
    max_grad_norm: float
    noise_multiplicity: int
    generator: torch.Generator

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, expected_batch_size: int,
             before_step: Callable[[], None] | None = None) -> PrivateSteps:
        return PrivateSteps(model, optimizer, noise_multiplier=self.account.noise_multiplier,
                            max_grad_norm=self.max_grad_norm, expected_batch_size=expected_batch_size,
                            noise_generator=self.generator, rows_per_record=self.noise_multiplicity,
                            account=self.account, before_step=before_step)
