"""The secret that seeds a party's privacy noise and its Poisson sampling.

DP noise drawn from a generator seeded by `train.seed` could be regenerated, and subtracted, by anyone who reads
the config (the coordinator, a reader of the run directory): no privacy at all. Each party that adds noise
creates a secret with `os.urandom` on first use and keeps it in its own state directory. Resuming there reuses
it, so a redone round releases exactly what it released before (and the accountant counts it once); nobody
without that file can reproduce the noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedgen.core.seeding import derive_seed

SECRET_FILE = "noise_secret"


class MissingSecretError(FileNotFoundError):
    """A party that has already released noised results has no secret: a new one would make a redone step a
    second, unaccounted release."""


def party_secret(directory: Path, create: bool = True) -> int:
    """The party's secret, made on first use; `create=False` where the party has released noise before."""
    path = Path(directory) / SECRET_FILE
    if not path.exists() and not create:
        raise MissingSecretError(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(int.from_bytes(os.urandom(8), "little") >> 1))
        os.chmod(tmp, 0o600)
        tmp.replace(path)
    return int(path.read_text())


def secret_generator(secret: int, *keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(secret, *keys))
