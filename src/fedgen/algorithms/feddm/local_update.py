"""A silo's local update in FedDM: copy the global weights, train E local epochs of Adam, report back.

Transport-free: the silo worker (algorithms/feddm/silo.py) hands it a state and gets a state back. One loop for
every variant: the batches and the optimiser step come from a `PlainSteps` or, under DP-SGD, from
privacy/dpsgd.PrivateSteps (same methods); FedProx and SCAFFOLD act through a remedy's hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from diffusers import DDPMScheduler
from torch import nn

from fedgen.algorithms.feddm.remedies import LocalRemedy
from fedgen.core.records import State
from fedgen.core.seeding import generator
from fedgen.data.silos import SiloData
from fedgen.data.transforms import random_hflip
from fedgen.diffusion.loss import diffusion_loss

if TYPE_CHECKING:  # the type only: a run without DP-SGD never imports Opacus
    from fedgen.privacy.dpsgd import DPSGD


class NonFiniteLossError(RuntimeError):
    """A local update produced a NaN or infinite loss; the round must be aborted."""


@dataclass
class FitResult:
    state: State
    num_examples: int
    mean_loss: float
    steps: int
    optimizer_state: dict | None = field(default=None, repr=False)


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    hflip: bool
    bf16: bool
    seed: int
    keep_optimizer: bool = False  # carry Adam's state across rounds (the centralized baseline)
    label_dropout: float = 0.0  # share of labels replaced by `null_label` (classifier-free guidance)
    null_label: int = -1
    min_snr_gamma: float | None = None  # loss weighting (diffusion/loss.py); None: uniform, eq. (2)
    lr_decay_rounds: int | None = None  # cosine decay of lr over these rounds (None: constant)
    lr_final_ratio: float = 0.1
    warmup_steps: int = 0  # linear warm-up of the lr over each local update's first steps (0: none)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    timestep_sampling: str = "uniform"  # diffusion/loss.py draw_timesteps
    lognormal: tuple[float, float] = (-1.2, 1.2)

    def warmup_factor(self, step: int) -> float:
        """The share of the round's learning rate used at local step `step` (0-based): (step + 1) / warmup_steps
        during the warm-up, then 1."""
        return 1.0 if step >= self.warmup_steps else (step + 1) / self.warmup_steps

    def lr_at(self, round_idx: int) -> float:
        """The local learning rate of round `round_idx` (0-based): cosine from `lr` to `lr_final_ratio * lr` over
        the first `lr_decay_rounds` rounds, then constant."""
        if self.lr_decay_rounds is None:
            return self.lr
        progress = min(round_idx / (self.lr_decay_rounds - 1), 1.0)
        return self.lr * (self.lr_final_ratio + (1 - self.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class PlainSteps:
    """Shuffled disjoint batches and a plain optimiser step on the mean loss (`before_step` with the gradients in
    place, just before the update)."""

    rows = 1  # loss rows per record

    def __init__(self, optimizer: torch.optim.Optimizer, before_step: Callable[[], None] | None = None):
        self.optimizer, self.before_step = optimizer, before_step

    def batches(self, dataset_size: int, batch_size: int, epochs: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
        for _ in range(epochs):
            yield from torch.randperm(dataset_size, generator=gen).split(batch_size)

    def step(self, row_losses: torch.Tensor, records: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        row_losses.mean().backward()
        if self.before_step is not None:
            self.before_step()
        self.optimizer.step()

    def close(self) -> None:
        return None


class _LossLog:
    """The local losses, kept on the device: the host reads them (one synchronisation) every `CHECK_EVERY` steps
    and at the end, instead of after every step. A non-finite loss aborts the update naming the step range where
    it appeared; the steps after it until the check are wasted but never returned."""

    CHECK_EVERY = 64

    def __init__(self, silo: int, round_idx: int):
        self.silo, self.round_idx = silo, round_idx
        self.pending: list[torch.Tensor] = []
        self.first_pending = 0  # local step of pending[0]
        self.steps, self.total, self.counted = 0, 0.0, 0

    def add(self, loss: torch.Tensor) -> None:
        if not self.pending:
            self.first_pending = self.steps
        self.pending.append(loss)
        self.steps += 1
        if len(self.pending) == self.CHECK_EVERY:
            self.check()

    def skip(self) -> None:
        self.steps += 1

    def check(self) -> None:
        if not self.pending:
            return
        values = torch.stack(self.pending).float().cpu()
        self.pending = []
        if not torch.isfinite(values).all():
            bad = int(torch.nonzero(~torch.isfinite(values))[0])
            first, last = self.first_pending, self.first_pending + len(values) - 1
            raise NonFiniteLossError(
                f"client {self.silo}, round {self.round_idx + 1}: loss is {values[bad].item()} at local step "
                f"{first + bad} (checked steps {first}-{last})"
            )
        self.total += float(values.double().sum())
        self.counted += len(values)

    def mean(self) -> float:
        return self.total / self.counted if self.counted else float("nan")


def _clone_state(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class LocalUpdate:
    """Silo `silo`'s local training. `model` is a work buffer that may be shared by silos run one after another."""

    def __init__(self, silo: int, data: SiloData, model: nn.Module, scheduler: DDPMScheduler,
                 device: torch.device):
        self.silo = silo
        self.data = data
        self.model = model
        self.scheduler = scheduler
        self.device = device

    def fit(self, global_state: State, round_idx: int, settings: TrainSettings,
            optimizer_state: dict | None = None, on_step: Callable[[], None] | None = None,
            private: DPSGD | None = None, remedy: LocalRemedy | None = None) -> FitResult:
        """E epochs of Adam on the DDPM loss, starting from `global_state`.

        Data order, timesteps and noise come from a generator seeded by (seed, round, silo), so the
        result does not depend on what ran before (resuming gives the same weights). A fresh Adam is
        used each round unless `settings.keep_optimizer` (the centralized baseline carries Adam's state).
        With `private`, the steps are DP-SGD (privacy/dpsgd.py: Poisson batches, per-image clipping, noise, the
        account advanced per step) and the generator is the silo's secret one. `remedy` (FedProx, SCAFFOLD;
        algorithms/feddm/remedies.py) acts just before and after each optimiser step.
        """
        if len(self.data) == 0:
            raise ValueError(f"client {self.silo} has no data: nothing to train on")
        model = self.model
        model.load_state_dict(global_state)
        model.train()
        lr = settings.lr_at(round_idx)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=settings.adam_betas)
        if settings.keep_optimizer and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
            for group in optimizer.param_groups:  # the saved state carries the lr of its own round
                group["lr"] = lr
        before_step = remedy.before_step if remedy is not None else None
        if private is not None:
            gen, steps = private.generator, private.wrap(model, optimizer, settings.batch_size, before_step)
        else:
            gen, steps = generator(settings.seed, "fit", round_idx, self.silo), PlainSteps(optimizer, before_step)
        losses = _LossLog(self.silo, round_idx)
        try:
            for step, idx in enumerate(steps.batches(len(self.data), settings.batch_size, settings.epochs, gen)):
                if step <= settings.warmup_steps:  # the step after the warm-up restores the round's lr
                    for group in optimizer.param_groups:
                        group["lr"] = lr * settings.warmup_factor(step)
                x0 = self.data.images[idx]
                if settings.hflip:
                    x0 = random_hflip(x0, gen)
                y = self.data.labels[idx]
                if settings.label_dropout > 0:
                    drop = torch.rand(len(y), generator=gen) < settings.label_dropout
                    y = torch.where(drop, settings.null_label, y)
                x0 = x0.to(self.device).repeat_interleave(steps.rows, 0)
                y = y.to(self.device).repeat_interleave(steps.rows, 0)
                if len(idx) == 0:  # an empty Poisson sample (DP only): a noise-only step
                    steps.step(torch.zeros(0), 0)
                    losses.skip()
                else:
                    per_row = diffusion_loss(model, self.scheduler, x0, y, gen, autocast_bf16=settings.bf16,
                                             reduction="none", min_snr_gamma=settings.min_snr_gamma,
                                             timestep_sampling=settings.timestep_sampling,
                                             lognormal=settings.lognormal)
                    losses.add(per_row.detach().mean())
                    steps.step(per_row, len(idx))
                if remedy is not None:
                    remedy.after_step()
                if on_step is not None:
                    on_step()
            losses.check()
        finally:
            steps.close()
        return FitResult(
            state=_clone_state(model),
            num_examples=len(self.data),
            mean_loss=losses.mean(),
            steps=losses.steps,
            optimizer_state=optimizer.state_dict() if settings.keep_optimizer else None,
        )


@torch.no_grad()
def evaluation_loss(model: nn.Module, scheduler: DDPMScheduler, data: SiloData, *, max_samples: int,
                    seed: int, key: object, device: torch.device, batch_size: int = 256) -> float:
    """DDPM loss of `model` on the first `max_samples` of a fixed seeded selection of `data`.

    Timesteps and noise are drawn from a generator seeded by `key` alone, so the number is comparable
    across rounds (the same images, t and noise every time).
    """
    if len(data) == 0 or max_samples < 1:
        raise ValueError("evaluation_loss needs at least one image")
    model.eval()
    gen = generator(seed, "eval-loss", key)
    n = min(max_samples, len(data))
    idx = torch.randperm(len(data), generator=gen)[:n]
    total = 0.0
    for chunk in idx.split(batch_size):
        x0 = data.images[chunk].to(device)
        y = data.labels[chunk].to(device)
        total += diffusion_loss(model, scheduler, x0, y, gen, reduction="none").sum().item()
    return total / n
