"""`flower-supernode` with short waits: the SuperNode of fedgen's fast path (`fedgen flower supernode`, default).

Flower 1.41.0's SuperNode loop (`flwr/supernode/start_client_internal.py`) sleeps 3 s whenever the SuperLink has
no message for it, and 0.5 s at a time while it waits for the ClientApp's reply; both are hard-coded. A message
that arrives just after a poll waits up to 3 s, and its reply up to 0.5 s more: seconds per message round however
small the work. This entry point runs Flower's own `flower-supernode` with that module's two sleeps replaced (its
other uses of `time` unchanged):
- the idle wait backs off: `IDLE_MIN_S` after a message, doubling at each empty poll up to Flower's 3 s. A run
  sends its next message soon after a reply (the next generator step, the loss evaluation after a fit), so the
  node answers within tens of milliseconds while a run is busy, and an idle node polls as rarely as Flower's own.
  Each poll is an authenticated HTTPS request the SuperLink answers for every node (about 20 ms of its CPU here):
  polling fast all the time cost the SuperLink half a core for 4 idle nodes.
- the wait for the ClientApp's reply, a check of the node's own memory, becomes `LOCAL_S`;
- a message's content that has not reached the SuperLink yet is asked for again after `PULL_FIRST_S`, doubling up
  to `PULL_CAP_S`, not after 1, 2, 4... s (runtimes/flower/prompt_pulls.py).

It changes a private detail of a pinned Flower: where the installed Flower is not the version and the code this
was written against (runtimes/flower/pins.py), the SuperNode runs with Flower's own waits, after a warning.
"""

from __future__ import annotations

import sys
import time
import warnings

IDLE_MIN_S = 0.02  # the first idle wait after a message (Flower: 3 s every time)
LOCAL_S = 0.01  # Flower's 0.5 s between checks for the ClientApp's reply (in the SuperNode's memory)
FLOWER_IDLE_S, FLOWER_REPLY_S = 3, 0.5  # the pinned code's hard-coded waits
PULL_FIRST_S, PULL_CAP_S = 0.02, 0.5  # retries of a message's content at the SuperLink (HTTPS requests)
# sha256 of inspect.getsource(...) in flwr 1.41.0: the functions whose waits are shortened
PINNED_SOURCES = {
    "start_client_internal.start_client_internal": "9e89a6eb68fbec6821e817cd2c09f7894fc7b0f5725c2365b19a7122307f11f3",
    "start_client_internal._push_messages": "00bb86faffdec114db87e7f716af2acd901d12284e44f51f5c2a84704db05f64",
    "start_client_internal._pull_and_store_message":
        "eaf5d0e36dc34e4cf46a490511d077ac55cc8edbbcdbe938c1f6dbcb758628be",
}


def flower_functions() -> dict:
    from flwr.supernode import start_client_internal as module

    return {"start_client_internal.start_client_internal": module.start_client_internal,
            "start_client_internal._push_messages": module._push_messages,
            "start_client_internal._pull_and_store_message": module._pull_and_store_message}


def flower_matches() -> str | None:
    from fedgen.runtimes.flower.pins import mismatch

    return mismatch(PINNED_SOURCES, flower_functions(), "the SuperNode's short waits")


class ShortWaits:
    """Stands in for the `time` module in Flower's SuperNode loop: `sleep(3)` (no message) backs off from
    `idle_min_s`, doubling up to 3 s; `sleep(0.5)` (a message is being answered) sleeps `local_s` and resets the
    back-off; any other sleep, and every other attribute, is `time`'s."""

    def __init__(self, idle_min_s: float = IDLE_MIN_S, local_s: float = LOCAL_S):
        self.idle_min_s, self.local_s = idle_min_s, local_s
        self.idle_s = idle_min_s

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_S:
            time.sleep(self.idle_s)
            self.idle_s = min(2 * self.idle_s, FLOWER_IDLE_S)
        elif seconds == FLOWER_REPLY_S:
            self.idle_s = self.idle_min_s
            time.sleep(self.local_s)
        else:
            time.sleep(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


def install(waits: ShortWaits | None = None) -> bool:
    """Shorten the SuperNode loop's waits (True), or leave Flower's (False, after a warning) on another Flower."""
    differs = flower_matches()
    if differs is not None:
        warnings.warn(f"{differs}: the SuperNode keeps Flower's own waits (3 s when idle, 0.5 s while a reply is "
                      "computed)", RuntimeWarning, stacklevel=2)
        return False
    from flwr.supernode import start_client_internal as module

    from fedgen.runtimes.flower.prompt_pulls import retry_promptly

    module.time = waits or ShortWaits()
    retry_promptly(module, "pull_objects", PULL_FIRST_S, PULL_CAP_S)
    return True


def main() -> None:
    """`python -m fedgen.runtimes.flower.deploy.short_waits [flower-supernode's arguments]`."""
    from flwr.supernode.cli import flower_supernode

    install()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
