"""Message delivery in Flower's simulation engine at a cost that follows the messages, not the virtual nodes.

Flower 1.41.0's simulation engine hands messages to its workers in `vce_api.add_messages_to_queue`: every 0.1 s,
for each of the N virtual nodes, `InMemoryLinkState.get_message_ins(node, limit=1)`, which walks every stored
message (and re-checks its expiry) under the state's lock. A tick costs N x M message checks with M messages in
the store: with N = 200 nodes and a `describe` to each at start-up, fedgen spent 70% of its process's samples
there and 284 s learning which node holds which silo; at N = 1,000 it grows 25-fold, and even a round of K = 10
messages costs N x 10 checks every tick, in the process that also runs the ServerApp.

`deliver_pending` is the same delivery in one pass per tick: under the same lock, the stored messages are checked
once (expired or invalid ones deleted by Flower's own `_check_stored_messages`), and each node's first
undelivered message is marked delivered and queued, exactly what the loop over nodes with `limit=1` does; and,
the pass being cheap, ticks come every 10 ms instead of 100 ms (a message waits less before an actor takes it).

It replaces a private function of a pinned Flower. `patched_delivery` installs it only where Flower is the
version and the code it was written against (runtimes/flower/pins.py: the version, and the source hashes of the
functions it stands for and calls); elsewhere Flower's own delivery runs, with a warning. tests/test_flower.py
fails when either changes, so an upgrade of Flower cannot silently keep a delivery it no longer matches.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue

from fedgen.runtimes.flower.pins import mismatch

TICK_S = 0.01  # Flower's loop waits 0.1 s between its (N x M) passes; one pass over M messages is cheap enough
# sha256 of inspect.getsource(...) in flwr 1.41.0 (runtimes/flower/pins.py): what `deliver_pending` stands for and
# relies on
PINNED_SOURCES = {
    "vce_api.add_messages_to_queue": "953f4bd41a931a7779a4a670ab17b633f6e20b08a0128535328674466419777a",
    "InMemoryLinkState.get_message_ins": "6547c8dcbc62e12f5b2aa5c69f4de8c7c7072c10d6c0876512cf37197d941056",
    "InMemoryLinkState._check_stored_messages": "2be47567d2478a58b766c116f1f0cd0ae3aa791d4e7e3ee85cb20d31f15a8082",
}


def _flower_functions() -> dict:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    return {"vce_api.add_messages_to_queue": vce_api.add_messages_to_queue,
            "InMemoryLinkState.get_message_ins": InMemoryLinkState.get_message_ins,
            "InMemoryLinkState._check_stored_messages": InMemoryLinkState._check_stored_messages}


def flower_matches() -> str | None:
    """None where the installed Flower is the one `deliver_pending` was written against, else what differs."""
    return mismatch(PINNED_SOURCES, _flower_functions(), "the faster delivery")


def deliver_pending(state, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Flower 1.41.0's `add_messages_to_queue` in one pass over the stored messages per tick (module docstring)."""
    from flwr.supercore.date import now

    while not f_stop.is_set():
        batch = []
        with state.lock:
            ids = list(state.message_ins_store.keys())
            state._check_stored_messages(set(ids))  # deletes the expired and the invalid, as get_message_ins does
            served: set[int] = set()
            for msg_id in ids:
                msg = state.message_ins_store.get(msg_id)
                if msg is None or msg.metadata.delivered_at != "":
                    continue
                node = msg.metadata.dst_node_id
                if node in served or node not in nodes_mapping:
                    continue
                served.add(node)  # at most one message per node per tick, as limit=1
                batch.append(msg)
            delivered_at = now().isoformat()
            for msg in batch:
                msg.metadata.delivered_at = delivered_at
        for msg in batch:
            queue.put(msg)
        f_stop.wait(TICK_S)


@contextmanager
def patched_delivery() -> Iterator[bool]:
    """Flower's simulation delivers with `deliver_pending` inside the block (yields True), or with its own where the
    installed Flower is not the pinned one (yields False, after a warning naming what differs)."""
    from flwr.server.superlink.fleet.vce import vce_api

    differs = flower_matches()
    if differs is not None:
        warnings.warn(f"{differs}: Flower's simulation keeps its own message delivery, whose cost grows with "
                      "the number of virtual nodes times the messages in flight", RuntimeWarning, stacklevel=2)
        yield False
        return
    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = deliver_pending
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
