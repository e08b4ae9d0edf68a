"""What the server side and the silos exchange: plain records, no transport.

A `Request` asks silo `silo` to do `kind` ("describe", "fit", "evaluate", ...) with named tensor dicts
(`arrays`, e.g. the global weights) and plain values (`config`). A silo answers with a `Reply` of the same
shape, or the runtime reports a `Failure` (the silo raised, died, timed out, or sent something unusable).
The in-process runtime hands these objects to the silo workers directly; the Flower runtime carries them in
Flower messages (ArrayRecord for the tensors, ConfigRecord for the values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fedgen.fl.aggregate import State, state_nbytes

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
    older than the run's ledger (fl/worker.SiloStateError); the round cannot go on without it (a missing privacy
    account must stop the run, not be skipped past)."""

    silo: int
    reason: str
    fatal: bool = False


def payload_nbytes(arrays: dict[str, State]) -> int:
    return sum(state_nbytes(state) for state in arrays.values())


class Worker(Protocol):
    """A silo's side of an algorithm: answers requests from the data it holds."""

    def handle(self, request: Request) -> Reply: ...


class ClientPool(Protocol):
    """Where the silos are: `send` delivers requests (at most one per silo) and returns what came back by
    `timeout` seconds, keyed by silo; a silo that did not answer usably is a `Failure`."""

    def send(self, requests: list[Request], timeout: float, progress=None) -> dict[int, Reply | Failure]: ...
