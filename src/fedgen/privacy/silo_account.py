"""A DP silo's check of its own privacy state against what the coordinator's ledger says it has released, before
it trains again (docs/DESIGN.md §8: epsilon is never under-reported)."""

from __future__ import annotations

from pathlib import Path

from fedgen.core.errors import SiloStateError
from fedgen.privacy.accountant import Account
from fedgen.privacy.secret import MissingSecretError, party_secret


def checked_secret(silo: int, folder: Path, account: Account | None, known_steps: int, round_idx: int) -> int:
    """The silo's noise secret, after checking its loaded `account` (from `folder`) against the `known_steps`
    the ledger holds for it. A silo with no account at all, or fewer steps than the ledger, or no secret after it
    released noise, refuses (SiloStateError naming the silo and the folder)."""
    where = f"its state folder {folder}"
    keep = ("restore that folder from a backup (it must be kept for the life of the run), or point the silo at "
            "the folder it trained with; the run stays at its last checkpoint")
    if account is None and known_steps > 0:
        raise SiloStateError(f"silo {silo}: the run's privacy ledger has {known_steps} DP-SGD steps of this silo, "
                             f"but {where} holds no privacy account as of round {round_idx}; refusing to start "
                             f"again at epsilon = 0: {keep}")
    if account is not None and account.steps < known_steps:
        raise SiloStateError(f"silo {silo}: {where} holds a privacy account of {account.steps} DP-SGD steps, "
                             f"fewer than the {known_steps} the run's ledger has for it (an older copy?); "
                             f"refusing to under-report epsilon: {keep}")
    released = known_steps > 0 or (account is not None and account.steps > 0)
    try:
        return party_secret(folder, create=not released)
    except MissingSecretError as exc:
        raise SiloStateError(f"silo {silo}: {where} has no noise secret ({exc.args[0]}) but this silo has "
                             f"released DP-noised results already; a new secret would make a redone round a "
                             f"second, unaccounted release: {keep}") from None
