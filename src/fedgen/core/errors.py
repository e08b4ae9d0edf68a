"""fedgen's own errors: bad input or a state the user can fix. The CLI prints them as one line; anything else
is a bug and keeps its traceback."""

from __future__ import annotations


class FedgenError(Exception):
    """Base of every error fedgen reports to a user as a plain message; the CLI exits with `exit_code`."""

    exit_code = 1


class UsageError(FedgenError, ValueError):
    """An option or argument that cannot be used (names the option and what was expected)."""


class SiloDataError(FedgenError):
    """A silo's data does not fit the run (other classes, another image shape, none at all)."""


class SiloStateError(FedgenError):
    """A silo's persistent state is missing or older than what the run's ledger says it released: it refuses to
    train rather than start a fresh privacy account (under-reporting epsilon) or a fresh noise secret (a second
    release of a redone round). The coordinator stops the run on it (`core.records.Failure.fatal`)."""
