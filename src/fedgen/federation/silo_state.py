"""A silo's persistent state: what must outlive one request (a privacy account, a noise secret, SCAFFOLD's
client variate, a discriminator, the centralized baseline's Adam state), kept where the silo runs and keyed by
the run's id (in-process and flower-sim: RUN/silos/silo_NNN; a SuperNode: its `--state` folder). It must be
kept for the life of the run: a silo that finds it missing refuses to train (core.errors.SiloStateError)."""

from __future__ import annotations

from pathlib import Path

import torch


class SiloStateStore:
    """Per-silo persistent state, one file per round: `save(r, state)` after round r, `load(r)` the state as of
    round r (the newest saved at or before r). Rounds after r (written by a run killed before it committed them)
    are ignored and overwritten when the round is redone."""

    def __init__(self, path: Path, keep: int = 2):
        self.path = Path(path)
        self.keep = keep

    def _file(self, round_idx: int) -> Path:
        return self.path / f"round_{round_idx:04d}.pt"

    def _rounds(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.path.glob("round_*.pt")) if self.path.exists() else []

    def load(self, round_idx: int) -> dict | None:
        usable = [r for r in self._rounds() if r <= round_idx]
        return torch.load(self._file(usable[-1]), weights_only=False) if usable else None

    def save(self, round_idx: int, state: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self._file(round_idx).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self._file(round_idx))
        older = [r for r in self._rounds() if r < round_idx]
        for r in older[: max(0, len(older) - (self.keep - 1))]:
            self._file(r).unlink(missing_ok=True)
