"""Where fedgen relies on Flower's private code (a function it replaces, or internals it calls), it pins the
version and the sha256 of each function's source it was written against; tests/test_flower.py fails when an
upgrade changes either, so the code is re-read rather than kept blindly."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable

PINNED_VERSION = "1.41.0"


def source_digests(functions: dict[str, Callable]) -> dict[str, str]:
    """sha256 of each function's source, by name."""
    return {name: hashlib.sha256(inspect.getsource(f).encode()).hexdigest() for name, f in functions.items()}


def mismatch(pinned: dict[str, str], functions: dict[str, Callable], what: str) -> str | None:
    """None where the installed Flower is PINNED_VERSION and each function's source hashes as `pinned` says, else
    what differs (`what`: the fedgen code that relies on it, for the message)."""
    import flwr

    version = getattr(flwr, "__version__", "?")
    if version != PINNED_VERSION:
        return f"flwr {version} ({what} was written against {PINNED_VERSION})"
    changed = [name for name, digest in source_digests(functions).items() if pinned[name] != digest]
    return f"flwr's {', '.join(changed)} changed" if changed else None
