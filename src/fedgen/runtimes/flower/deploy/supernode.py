"""`fedgen flower supernode`: runs `flower-supernode` for one silo (its output cleaned of colour codes and
HTTP access lines), turns its failures (unreachable SuperLink, certificate not trusted, key not registered) into
one clear message, says in a line of its own when it stops, and takes `flower-supernode` with it however it
ends (SIGKILL included, on Linux).

The fast path (default; `--no-fast` runs Flower's stock SuperNode): the SuperNode with short waits
(deploy/short_waits.py) and `--isolation process`, and next to it fedgen's long-lived node worker
(deploy/node_worker.py), which runs the node's messages in one process that keeps torch, the silo's data and its
state loaded. The two share a SuperExec secret, a random file readable by this user alone; a worker that ends
is started again (the message it held is a failed silo for that round).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedgen.core.errors import UsageError
from fedgen.core.paths import silo_state_home
from fedgen.runtimes.flower.deploy.certs import check_node_key
from fedgen.runtimes.flower.deploy.common import (
    DeploymentError,
    FlowerProcess,
    flwr_bin,
    last_lines,
    need_file,
    stop_on_signals,
)


def supernode_command(superlink: str, certs: Path | None, key: Path | None, partition_id: int,
                      data: Path | None, port: int, max_wait_s: float, state_dir: Path | None,
                      secret: Path | None = None) -> list[str]:
    """`flower-supernode`'s command line; with `secret` (the fast path), the short-waits SuperNode in process
    isolation, its tasks signed with that SuperExec secret."""
    if partition_id < 0:
        raise UsageError(f"--partition-id is this silo's number, 0..N-1 for a run of fl.clients=N silos: it "
                         f"cannot be negative, got {partition_id}")
    node_config = f"partition-id={partition_id}"
    if data is not None:
        if not data.exists():
            raise DeploymentError(f"silo data {data} not found")
        node_config += f" data-path='{data.resolve()}'"
    node_config += f" state-dir='{Path(state_dir or silo_state_home()).resolve()}'"
    program = [flwr_bin("flower-supernode")] if secret is None else \
        [sys.executable, "-m", "fedgen.runtimes.flower.deploy.short_waits", "--isolation", "process",
         "--superexec-auth-secret-file", str(secret)]
    cmd = [*program, "--superlink", superlink, "--port", str(port), "--node-config", node_config,
           "--max-wait-time", f"{max_wait_s:g}"]
    if certs is None:
        return [*cmd, "--insecure"]
    if key is None:
        raise DeploymentError("SuperNode authentication is on: pass --key (a node key from `fedgen flower certs`)")
    check_node_key(key)
    return [*cmd, "--root-certificates", str(need_file(certs / "ca.crt", "CA certificate")),
            "--auth-supernode-private-key", str(key)]


def explain_supernode_failure(output: str, superlink: str, certs: Path | None, key: Path | None,
                              max_wait_s: float) -> str:
    if "CERTIFICATE_VERIFY_FAILED" in output or "certificate verify failed" in output.lower():
        return (f"TLS: the SuperLink at {superlink} presented a certificate not signed by "
                f"{certs / 'ca.crt' if certs else 'the CA'} (wrong --certs, or the certificate does not name this "
                "address: `fedgen flower certs --host NAME`)")
    if "code: 2004" in output:
        return (f"the SuperLink at {superlink} refused node key {key}: it is not registered there (restart `fedgen "
                f"flower superlink` with its .pub in --certs, or `fedgen flower register {key}.pub`), or a node with "
                "this key was killed less than a minute ago and is not yet marked offline")
    if "code: 2001" in output:
        return f"the SuperLink at {superlink} requires SuperNode authentication: pass --key"
    if "Giving up reconnection" in output or "Exit Code: 305" in output:
        return f"could not reach the SuperLink at {superlink} within {max_wait_s:g}s (--max-wait)"
    return "flower-supernode failed:\n" + last_lines(output, 10)


def _print(line: str) -> None:
    print(line, flush=True)


WORKER_SETTLE_S, WORKER_QUICK_ENDS = 30.0, 3  # a worker that ends this many times in a row this soon cannot run


def worker_command(port: int, secret: Path) -> list[str]:
    return [sys.executable, "-m", "fedgen.runtimes.flower.deploy.node_worker", "--runtime-api-address",
            f"127.0.0.1:{port}", "--secret-file", str(secret)]


def _new_secret() -> tuple[tempfile.TemporaryDirectory, Path]:
    """A random SuperExec secret in a folder of its own, both readable by this user alone."""
    folder = tempfile.TemporaryDirectory(prefix="fedgen-node-")  # mode 0700
    path = Path(folder.name) / "superexec-secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    return folder, path


def serve_supernode(superlink: str, certs: Path | None, key: Path | None, partition_id: int, data: Path | None,
                    port: int = 9094, max_wait_s: float = 60, state_dir: Path | None = None,
                    echo: Callable[[str], None] = _print, fast: bool = True) -> int:
    """Run one SuperNode (one silo) until it is stopped (SIGINT/SIGTERM: exit status 0) or its `flower-supernode`
    ends; a failure (to join, or a killed `flower-supernode`) is a DeploymentError. Every way out says so in one
    line: "SuperNode for silo I stopped: ...". With `fast`, the node worker runs beside it and is restarted when it
    ends."""
    folder, secret = _new_secret() if fast else (None, None)
    cmd = supernode_command(superlink, certs, key, partition_id, data, port, max_wait_s, state_dir, secret)
    stop = stop_on_signals()
    worker, started, quick_ends = None, 0.0, 0
    try:
        node = FlowerProcess(cmd, echo, name="flower-supernode")
        try:
            while node.poll() is None and not stop.requested:
                if fast and (worker is None or worker.poll() is not None):
                    if worker is not None:
                        quick_ends = quick_ends + 1 if time.monotonic() - started < WORKER_SETTLE_S else 0
                        if quick_ends >= WORKER_QUICK_ENDS:  # it cannot start: say why rather than loop
                            raise DeploymentError(f"the node worker for silo {partition_id} ended {quick_ends} times "
                                                  f"within {WORKER_SETTLE_S:g}s of starting:\n"
                                                  f"{last_lines(worker.output, 10)}")
                        echo(f"node worker for silo {partition_id} ended ({worker.how_it_ended()}); starting it "
                             "again")
                    worker = FlowerProcess(worker_command(port, secret), echo, name="fedgen-node-worker")
                    started = time.monotonic()
                time.sleep(0.2)
        finally:
            if worker is not None:
                worker.stop()
            node.stop()
    finally:
        stop.restore()
        if folder is not None:
            folder.cleanup()
    return node.ended(f"SuperNode for silo {partition_id} stopped", stop, echo,
                      lambda output: explain_supernode_failure(output, superlink, certs, key, max_wait_s))
