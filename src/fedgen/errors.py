"""fedgen's own errors: bad input or a state the user can fix. The CLI prints them as one line; anything else
is a bug and keeps its traceback."""

from __future__ import annotations


class FedgenError(Exception):
    """Base of every error fedgen reports to a user as a plain message."""


class UsageError(FedgenError, ValueError):
    """An option or argument that cannot be used (names the option and what was expected)."""
