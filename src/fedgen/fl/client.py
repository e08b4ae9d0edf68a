"""A client's work in FedDM: copy the global weights, train E local epochs of Adam, report back.

Transport-free: a runtime (in-process loop, Flower app) hands it a state and gets a state back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler
from torch import nn

from fedgen.data.transforms import random_hflip
from fedgen.diffusion.loss import diffusion_loss
from fedgen.fl.aggregate import State
from fedgen.fl.remedies import LocalRemedy
from fedgen.seeding import generator


class NonFiniteLossError(RuntimeError):
    """A local update produced a NaN or infinite loss; the round must be aborted."""


@dataclass
class ClientData:
    images: torch.Tensor  # float32 (N, C, H, W) in [-1, 1]
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


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


@dataclass
class PrivateFit:
    """DP-SGD for one local update (fedgen.privacy.dpsgd): Poisson batches at `sample_rate`, `noise_multiplicity`
    rows per image, per-image clipping to `max_grad_norm`, noise `noise_multiplier * max_grad_norm`. Batches and
    noise come from `generator` (seeded by the silo's secret, not by the run seed)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_epoch: int
    noise_multiplicity: int
    generator: torch.Generator


class _LossLog:
    """The local losses, kept on the device: the host reads them (one synchronisation) every `CHECK_EVERY` steps
    and at the end, instead of after every step. A non-finite loss aborts the update naming the step range where
    it appeared; the steps after it until the check are wasted but never returned."""

    CHECK_EVERY = 64

    def __init__(self, client_id: int, round_idx: int):
        self.client_id, self.round_idx = client_id, round_idx
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
                f"client {self.client_id}, round {self.round_idx + 1}: loss is {values[bad].item()} at local step "
                f"{first + bad} (checked steps {first}-{last})"
            )
        self.total += float(values.double().sum())
        self.counted += len(values)

    def mean(self) -> float:
        return self.total / self.counted if self.counted else float("nan")


def _clone_state(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class DiffusionClient:
    """One data owner. `model` is a work buffer that may be shared by clients run one after another."""

    def __init__(self, client_id: int, data: ClientData, model: nn.Module, scheduler: DDPMScheduler,
                 device: torch.device):
        self.client_id = client_id
        self.data = data
        self.model = model
        self.scheduler = scheduler
        self.device = device

    def fit(self, global_state: State, round_idx: int, settings: TrainSettings,
            optimizer_state: dict | None = None, on_step: Callable[[], None] | None = None,
            private: PrivateFit | None = None, remedy: LocalRemedy | None = None) -> FitResult:
        """E epochs of Adam on the DDPM loss, starting from `global_state`.

        Data order, timesteps and noise come from a generator seeded by (seed, round, client), so the
        result does not depend on what ran before (resuming gives the same weights). A fresh Adam is
        used each round unless `settings.keep_optimizer` (the centralized baseline carries Adam's state).
        With `private`, the steps are DP-SGD (Poisson batches, per-image clipping, noise). `remedy` (FedProx,
        SCAFFOLD; fl/remedies.py) acts just before and after each optimiser step.
        """
        if len(self.data) == 0:
            raise ValueError(f"client {self.client_id} has no data: nothing to train on")
        model = self.model
        model.load_state_dict(global_state)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
        if settings.keep_optimizer and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        gen = private.generator if private is not None else generator(settings.seed, "fit", round_idx, self.client_id)
        trainer = None
        if private is not None:
            from fedgen.privacy.dpsgd import PrivateTrainer

            trainer = PrivateTrainer(model, optimizer, noise_multiplier=private.noise_multiplier,
                                     max_grad_norm=private.max_grad_norm, expected_batch_size=settings.batch_size,
                                     noise_generator=gen, before_step=remedy.before_step if remedy else None)
        rows = private.noise_multiplicity if private is not None else 1
        losses = _LossLog(self.client_id, round_idx)
        try:
            for idx in self._batches(settings, gen, private):
                x0 = self.data.images[idx]
                if settings.hflip:
                    x0 = random_hflip(x0, gen)
                y = self.data.labels[idx]
                if settings.label_dropout > 0:
                    drop = torch.rand(len(y), generator=gen) < settings.label_dropout
                    y = torch.where(drop, settings.null_label, y)
                x0, y = x0.to(self.device).repeat_interleave(rows, 0), y.to(self.device).repeat_interleave(rows, 0)
                if len(idx) == 0:  # an empty Poisson sample (DP only): a noise-only step
                    trainer.step(torch.zeros(0), 0)
                    losses.skip()
                else:
                    per_row = diffusion_loss(model, self.scheduler, x0, y, gen, autocast_bf16=settings.bf16,
                                             reduction="none")
                    losses.add(per_row.detach().mean())
                    if trainer is not None:
                        trainer.step(per_row, len(idx))
                    else:
                        optimizer.zero_grad(set_to_none=True)
                        per_row.mean().backward()
                        if remedy is not None:
                            remedy.before_step()
                        optimizer.step()
                if remedy is not None:
                    remedy.after_step()
                if on_step is not None:
                    on_step()
            losses.check()
        finally:
            if trainer is not None:
                trainer.close()
        return FitResult(
            state=_clone_state(model),
            num_examples=len(self.data),
            mean_loss=losses.mean(),
            steps=losses.steps,
            optimizer_state=optimizer.state_dict() if settings.keep_optimizer else None,
        )

    def _batches(self, settings: TrainSettings, gen: torch.Generator, private: PrivateFit | None):
        """Index batches of E epochs: shuffled disjoint batches, or (DP) Poisson samples at the sampling rate."""
        n = len(self.data)
        for _ in range(settings.epochs):
            if private is not None:
                from fedgen.privacy.dpsgd import poisson_batch

                for _ in range(private.steps_per_epoch):
                    yield poisson_batch(n, private.sample_rate, gen)
            else:
                yield from torch.randperm(n, generator=gen).split(settings.batch_size)


@torch.no_grad()
def evaluation_loss(model: nn.Module, scheduler: DDPMScheduler, data: ClientData, *, max_samples: int,
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
