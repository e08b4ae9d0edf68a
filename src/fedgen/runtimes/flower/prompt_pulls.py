"""Object pulls that retry in milliseconds, not seconds, in each of a deployment's three pulling processes.

In Flower 1.41.0 a message is announced before its content has arrived: the SuperLink hands a node (or the
ServerApp) a message whose tensors the sender is still pushing, and a SuperNode creates a ClientApp task before
it has fetched the content from the SuperLink. The puller then retries the missing objects after 1 s, 2 s, 4 s
(`PULL_INITIAL_BACKOFF`, doubling up to 10 s): measured here, 5-8 s per message on a 2-core machine, most of a
small round. Each of fedgen's processes that pulls (the ServerApp, the short-waits SuperNode, the node worker)
calls `retry_promptly` on the one function it pulls through: the same pull, with the first retry after
`first_s` and the back-off capped at `cap_s`.

Private to a pinned Flower: the callers pin the source of the function that makes the call (runtimes/flower/
pins.py), and nothing is changed on another Flower.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType


def retry_promptly(module: ModuleType, name: str, first_s: float, cap_s: float) -> None:
    """`module.name` (a Flower pull function taking `initial_backoff` and `backoff_cap`) with those two set."""
    function = getattr(module, name)
    if isinstance(function, partial):  # already done in this process
        return
    setattr(module, name, partial(function, initial_backoff=first_s, backoff_cap=cap_s))
