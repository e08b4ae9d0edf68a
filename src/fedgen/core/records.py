"""What the coordinator and the silos exchange, as plain records with no transport, and the two protocols they
are exchanged through.

A `Request` asks silo `silo` to do `kind` ("describe", "fit", "evaluate", "pga-step") with named tensor dicts
(`arrays`, e.g. the global weights) and plain values (`config`). A silo answers with a `Reply` of the same
shape, or the runtime reports a `Failure` (the silo raised, died, timed out, or sent something unusable).
The in-process runtime hands these objects to the silo workers directly; the Flower runtimes carry them in
Flower messages (runtimes/flower/codec.py: ArrayRecord for the tensors, ConfigRecord for the values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

State = dict[str, torch.Tensor]  # a model's (or a control variate's) named tensors
Value = int | float | str | bool | list[int] | list[float] | list[str]


@dataclass
class Request:
    silo: int
    kind: str
    arrays: dict[str, State] = field(default_factory=dict)
    config: dict[str, Value] = field(default_factory=dict)


@dataclass
class Reply:
    silo: int
    arrays: dict[str, State] = field(default_factory=dict)
    config: dict[str, Value] = field(default_factory=dict)


@dataclass
class Failure:
    """A silo that did not answer usably. `fatal`: the silo refused because its persistent state is missing or
    older than the run's ledger (`core.errors.SiloStateError`); the round cannot go on without it (a missing
    privacy account must stop the run, not be skipped past)."""

    silo: int
    reason: str
    fatal: bool = False


def state_nbytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def payload_nbytes(arrays: dict[str, State]) -> int:
    return sum(state_nbytes(state) for state in arrays.values())


@runtime_checkable
class Worker(Protocol):
    """A silo's side of an algorithm: answers requests from the data it holds. `on_step`, when a runtime sets
    it, is called after every local optimiser step (progress bars)."""

    on_step: Callable[[], None] | None

    def handle(self, request: Request) -> Reply: ...

    def steps(self, request: Request) -> int:
        """The optimiser steps `request` will take (the length of its progress bar; 0 when it trains nothing)."""
        ...


class SiloPool(Protocol):
    """Where the silos are: `send` delivers requests (at most one per silo) and returns what came back by
    `timeout` seconds, keyed by silo; a silo that did not answer usably is a `Failure`."""

    def send(self, requests: list[Request], timeout: float, progress=None) -> dict[int, Reply | Failure]: ...
