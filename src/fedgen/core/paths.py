"""Where fedgen keeps files outside a run directory.

Caches (`cache_dir`: evaluation classifiers, features) may be deleted at any time. A silo's persistent state
(`silo_state_home`: its privacy accounts, noise secrets, control variates, discriminators) must not: deleting it
would reset a silo's epsilon, so it lives under the user's state directory (XDG_STATE_HOME), never a cache.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    path = Path(os.environ.get("FEDGEN_CACHE", Path.home() / ".cache" / "fedgen"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def silo_state_home() -> Path:
    """The default folder of a SuperNode's silo state: $XDG_STATE_HOME/fedgen/silos (~/.local/state/...)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fedgen" / "silos"
