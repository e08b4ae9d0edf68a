"""Where fedgen keeps files outside a run directory.

Caches (`cache_dir`: evaluation classifiers, features) may be deleted at any time. A silo's persistent state
(`silo_state_home`: its privacy accounts, noise secrets, control variates, discriminators) must not: deleting it
would reset a silo's epsilon, so it lives under the user's state directory (XDG_STATE_HOME), never a cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedgen.core.errors import UsageError


def cache_dir() -> Path:
    path = Path(os.environ.get("FEDGEN_CACHE", Path.home() / ".cache" / "fedgen"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def silo_state_home() -> Path:
    """The default folder of a SuperNode's silo state: $XDG_STATE_HOME/fedgen/silos (~/.local/state/...)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fedgen" / "silos"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what both PIL (grids) and matplotlib (plots) write


def image_output(path: Path, option: str = "--out") -> Path:
    """An image file to write: its format comes from its name, so a name without a known one is refused before
    any work (not after minutes of sampling)."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        got = f"'{path.suffix}'" if path.suffix else "no extension"
        raise UsageError(f"{option} {path}: an image file name must end in {', '.join(IMAGE_SUFFIXES)} "
                         f"(got {got})")
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give an image file name such as {path / 'grid.png'}")
    return path
