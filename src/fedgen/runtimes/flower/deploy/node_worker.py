"""A SuperNode's long-lived fedgen worker: the fast path of a deployment (`fedgen flower supernode`, default).

Flower 1.41.0 runs every message a SuperNode receives in a new `flwr-clientapp` process, started by the node's
SuperExec after a poll of up to 1 s: about 1.6 s before any fedgen code runs, then torch, diffusers and the silo's
data are loaded again (4 s and more on 2 cores), for every message. A PGA generator step is one message.

This worker takes the SuperExec's place on its node. The SuperNode runs with `--isolation process` (it starts no
SuperExec of its own); the worker polls the SuperNode's Runtime API (127.0.0.1, the port the node was given)
for ClientApp tasks, every 10 ms after a task and less often while there is none, and runs each one in this
process as `flwr-clientapp` would: pull the task's message and context, call fedgen's ClientApp
(runtimes/flower/client_app.py, whose per-process caches keep the run's config, the silo's data and its worker,
model and state in memory), push the reply and the task's status. It listens on nothing; the SuperNode's Runtime
API it talks to is Flower's, on the loopback interface, and fedgen gives it a SuperExec secret (a file only the
node's user can read) so that no other process can take the node's tasks.

It runs only fedgen's own app (the FAB `fedgen/fedgen-app` that `fedgen train --runtime flower` submits); any
other FAB's task is answered with an error. The Flower functions it calls (how `flwr-clientapp` pulls and pushes
a task, and the SuperExec's loop it mirrors) are private to Flower: pinned by version and source hash
(runtimes/flower/pins.py), and the worker refuses to start on another Flower.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

FEDGEN_FAB = "fedgen/fedgen-app"
# between AcquireTask calls without a task: from POLL_MIN_S after a task, doubling up to POLL_MAX_S (each call is a
# local HTTP request, a few ms of CPU on each side: polling every 20 ms cost 15% of a core per idle node here)
POLL_MIN_S, POLL_MAX_S = 0.01, 0.5
# sha256 of inspect.getsource(...) in flwr 1.41.0: the code this worker mirrors (run_superexec's loop,
# run_clientapp's body) and the functions it calls
PINNED_SOURCES = {
    "run_superexec.run_superexec": "d11f4e7fbc8f0b121804772495484fae8987b2b52af8b2baa70baf40d5929e26",
    "run_clientapp.run_clientapp": "6ce09559f3a2f5dcafb7d08f4b443585d76b9b53b9cb29ba1ec06a6982163443",
    "run_clientapp.pull_task_input": "5607a23e1673ee876930c1b35685b8dfdfd8b3776a436560b0467042e15fc695",
    "run_clientapp.push_message": "07cb512c93e065a93a4cba3facc7d37dd99758c56835065a63fdfbfc604dcd8a",
    "run_clientapp.push_task_output": "9206407456e79e17338d367de7c21e2d840d939de378c03ac61da6cc2b57a3c6",
}
AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})  # what run_superexec signs with the secret
# The SuperNode creates a task before it has fetched the message's content from the SuperLink (runtimes/flower/
# prompt_pulls.py): the worker retries after 10 ms, doubling up to 0.1 s, a local request to its own SuperNode each.
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.01, 0.1


def flower_functions() -> dict:
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode.runtime import run_clientapp

    return {"run_superexec.run_superexec": run_superexec.run_superexec,
            "run_clientapp.run_clientapp": run_clientapp.run_clientapp,
            "run_clientapp.pull_task_input": run_clientapp.pull_task_input,
            "run_clientapp.push_message": run_clientapp.push_message,
            "run_clientapp.push_task_output": run_clientapp.push_task_output}


def flower_matches() -> str | None:
    from fedgen.runtimes.flower.pins import mismatch

    return mismatch(PINNED_SOURCES, flower_functions(), "fedgen's node worker")


def pull_promptly() -> None:
    """In this process, `pull_task_input` retries an object that is not there yet after PULL_BACKOFF_S (doubling
    up to PULL_BACKOFF_CAP_S) instead of Flower's 1 s (doubling up to 10 s)."""
    from flwr.supernode.runtime import run_clientapp

    from fedgen.runtimes.flower.prompt_pulls import retry_promptly

    retry_promptly(run_clientapp, "pull_and_inflate_object_from_tree", PULL_BACKOFF_S, PULL_BACKOFF_CAP_S)


def _client(address: str, *interceptors):
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
        retry_invoker=make_simple_http_retry_invoker())


def run_task(address: str, token: str) -> None:
    """One ClientApp task, in this process: what `flwr-clientapp --token` does, without installing the FAB (the
    app is fedgen's, already imported)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from fedgen.runtimes.flower.client_app import app

    client = _client(address, RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, _fab = pull_task_input(client)
        if run.fab_id != FEDGEN_FAB:
            raise RuntimeError(f"fedgen's node worker runs fedgen's app ({FEDGEN_FAB}) only, not {run.fab_id!r}: "
                               "start this SuperNode with `fedgen flower supernode --no-fast` for other apps")
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - reported to the ServerApp as the task's error, as flwr-clientapp does
        details = f"{type(exc)}:<'{exc}'>"
        print(f"error: task failed: {details}", flush=True)
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()


def serve(address: str, secret: bytes | None, stop=lambda: False) -> None:
    """Take and run the node's ClientApp tasks until `stop()` is true."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    interceptors = [SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=AUTH_METHODS)] \
        if secret else []
    client = _client(address, *interceptors)
    print(f"fedgen node worker: taking ClientApp tasks from {address}", flush=True)
    wait = POLL_MIN_S
    try:
        while not stop():
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"],
                                                        agentapp_fab_hashes=[]))
            if res.HasField("task") and res.token:
                run_task(address, res.token)
                wait = POLL_MIN_S
            else:
                time.sleep(wait)
                wait = min(2 * wait, POLL_MAX_S)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fedgen's per-node worker (started by `fedgen flower supernode`)")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--secret-file", type=Path, default=None, help="the SuperExec secret the node was given")
    args = parser.parse_args(argv)
    differs = flower_matches()
    if differs is not None:
        print(f"error: {differs}; fedgen's node worker cannot run (use `fedgen flower supernode --no-fast`)",
              file=sys.stderr, flush=True)
        return 2
    import fedgen.runtimes.flower.client_app  # noqa: F401 - torch, diffusers and fedgen loaded once, here

    pull_promptly()

    serve(args.runtime_api_address, args.secret_file.read_bytes() if args.secret_file else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
