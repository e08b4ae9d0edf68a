"""Record-level DP-SGD for one party's local training, on Opacus 1.6 (per-sample gradients, clipping, noise).

`PrivateTrainer` wraps a model and a torch optimizer for the steps of one local update. The caller computes one
loss per row; a record may have several rows (noise multiplicity, DPDM: K noise draws of the same image), whose
gradients are averaged before clipping, so the privacy cost is that of one row per record. Upstream Opacus does
not have this: the per-row gradients Opacus computes are summed per record here, between backward and the
optimizer's clip-and-noise step.

Batches are Poisson samples (every record in with probability q, independently), drawn from the party's secret
generator: the subsampling the accountant's amplification assumes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fedgen.errors import FedgenError


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
    problems = []
    for name, module in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None and any(p.requires_grad for p in module.parameters(recurse=False)):
            problems += [f"  {name or '(the model)'} ({type(module).__name__}): {str(e).split('. ')[0]}"
                         for e in validator(module)]
    if problems:
        raise PrivacyModelError("Opacus cannot train this model with DP-SGD:\n" + "\n".join(problems))


class PrivateTrainer:
    """Per-sample clipping to `max_grad_norm` and Gaussian noise of std `noise_multiplier * max_grad_norm` on the
    sum, divided by the expected batch size (Opacus's DPOptimizer), for `optimizer` over `model`'s parameters."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, noise_generator: torch.Generator,
                 before_step: Callable[[], None] | None = None):
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
        if before_step is not None:  # after clipping and noise, before the update (FedProx's data-free term)
            self.optimizer.attach_step_hook(lambda _optimizer: before_step())
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, row_losses: torch.Tensor, records: int) -> None:
        """One DP step from the rows' losses (`records` records of equal row counts, rows of a record adjacent)."""
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

