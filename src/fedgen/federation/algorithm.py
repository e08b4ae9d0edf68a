"""What the round loop drives: an `Algorithm` (FedDM, PGA: algorithms/), built from a `RoundContext`.

The loop (federation/loop.py) owns the run: the run directory, resume, the ledger's record per round,
checkpoints, samples and evaluation. An algorithm owns what one round computes and what it must checkpoint; it
reaches the silos only through `ctx.fed.pool` (a `core.records.SiloPool`), with plain requests and replies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from rich.console import Console
from rich.progress import Progress

from fedgen.config import Config
from fedgen.core.errors import FedgenError
from fedgen.core.records import Failure, State
from fedgen.federation.rundir import Checkpoint, RunDir
from fedgen.federation.silos import Federation
from fedgen.privacy.ledger import RunPrivacy


class TrainingAborted(FedgenError, RuntimeError):
    """A round failed; the run directory still holds the last good checkpoint."""


class LabelledSampler(Protocol):
    """A trained model as a "labelled sampler": labels and a seed in, images in [-1, 1] out. Sample grids,
    evaluation and audits take one, so diffusion and GAN runs share `sample`, `evaluate` and the grids."""

    evaluations_per_image: int  # network evaluations per image (the progress bar's unit)

    @property
    def device(self) -> torch.device: ...

    def describe(self) -> dict: ...

    def check(self) -> None: ...

    def images(self, labels: torch.Tensor, seed: int, progress=None) -> torch.Tensor: ...


class RoundContext:
    """What an algorithm's rounds need: the config, run directory, silos, device, console and progress."""

    def __init__(self, cfg: Config, run: RunDir, fed: Federation, device: torch.device, console: Console):
        self.cfg, self.run, self.fed, self.device, self.console = cfg, run, fed, device, console
        self.progress: Progress | None = None

    def last_checkpoint(self) -> str:
        last = self.run.committed_rounds()
        return f"round {last[-1]}" if last else "none yet (no round completed)"

    def stop_on_fatal(self, round_idx: int, replies: dict) -> None:
        """A silo that refused because its persistent state is missing or behind the ledger stops the run: going on
        without it would hide the problem, and it can never rejoin until its state is restored."""
        fatal = {s: f.reason for s, f in sorted(replies.items()) if isinstance(f, Failure) and f.fatal}
        if fatal:
            raise TrainingAborted(
                f"round {round_idx + 1} aborted: " + "; ".join(fatal.values()) + ". Nothing was written for this "
                f"round; the last good checkpoint in {self.run.checkpoints} is {self.last_checkpoint()}.")

    def abort(self, round_idx: int, accepted: int, asked: int, rejected: dict[int, str]) -> TrainingAborted:
        where = self.last_checkpoint()
        why = "; ".join(f"client {s}: {reason}" for s, reason in rejected.items())
        return TrainingAborted(
            f"round {round_idx + 1} aborted: {accepted} of {asked} clients returned a usable update, fewer than "
            f"fl.min_clients={self.cfg.fl.min_clients} ({why}). Nothing was written for this round; the last good "
            f"checkpoint in {self.run.checkpoints} is {where}; rerun the same command to resume from it."
        )


@runtime_checkable
class Algorithm(Protocol):
    """One federated generative algorithm's coordinating side, as the round loop drives it."""

    privacy: RunPrivacy  # the run's ledger: what the silos report, what the coordinator itself spends
    weights: str  # which weights `sampler()` draws with: "ema" (a weight average) or "raw"

    @property
    def network(self) -> torch.nn.Module:
        """The network being trained (the U-Net, the generator)."""
        ...

    def round(self, r: int) -> tuple[dict, dict[int, State]]:
        """Round r (from 0): its metrics record and the silos' local models to keep with the checkpoint."""
        ...

    def checkpoint(self, rounds_done: int, meta: dict) -> Checkpoint: ...

    def restore(self, ckpt: Checkpoint) -> None: ...

    def summary(self, record: dict) -> str:
        """One console line for a round's record."""
        ...

    def sampler(self) -> LabelledSampler:
        """The current model as a labelled sampler (its evaluation sampler and steps, for a diffusion model)."""
        ...


MakeAlgorithm = Callable[[RoundContext], Algorithm]
