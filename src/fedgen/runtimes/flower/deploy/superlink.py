"""`fedgen flower superlink`: runs `flower-superlink` (HTTPS on one port; no per-run dependency installation: runs
use the installed fedgen), registers the nodes' public keys, and stops it (by PID) when it is stopped."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from fedgen.runtimes.flower.deploy.common import (
    CONNECTION,
    DeploymentError,
    FlwrHome,
    flwr_bin,
    flwr_env,
    json_answer,
    last_lines,
    need_file,
    stop_on_signals,
    terminate,
)


def superlink_command(certs: Path | None, host: str, port: int, database: Path | None) -> list[str]:
    cmd = [flwr_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if database is not None:
        cmd += ["--database", str(database)]
    if certs is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-ca-certfile", str(need_file(certs / "ca.crt", "CA certificate")),
            "--ssl-certfile", str(need_file(certs / "superlink.crt", "SuperLink certificate")),
            "--ssl-keyfile", str(need_file(certs / "superlink.key", "SuperLink key")), "--enable-supernode-auth"]


def register_keys(home: FlwrHome, keys: list[Path], log: Callable[[str], None]) -> None:
    for pub in keys:
        done = home.run("supernode", "register", str(pub), CONNECTION, "--format", "json")
        text = done.stdout + done.stderr
        if done.returncode == 0 and '"success": true' in text.replace("'", '"'):
            log(f"registered {pub.name}: node id {_node_id(text)}")
        elif "already" in text.lower():
            log(f"{pub.name} was registered before")
        else:
            raise DeploymentError(f"could not register {pub}: {last_lines(text)}")


def _node_id(text: str) -> str:
    return str(json_answer(text).get("node-id", "?"))


def _wait_ready(home: FlwrHome, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"flower-superlink exited with status {proc.returncode}")
        if home.run("supernode", "ls", CONNECTION, timeout=20).returncode == 0:
            return
        time.sleep(0.5)
    raise DeploymentError(f"the SuperLink did not come up within {timeout:g}s")


def serve_superlink(certs: Path | None, host: str = "127.0.0.1", port: int = 8000, database: Path | None = None,
                    log: Callable[[str], None] = print, ready: Callable[[], None] | None = None) -> int:
    """Run a SuperLink until this process is stopped (SIGINT/SIGTERM); register certs/node-*.pub first.
    Returns the SuperLink's exit status. The SuperLink is stopped by PID on the way out, whatever happens."""
    cmd = superlink_command(certs, host, port, database)
    keys = sorted(certs.glob("node-*.pub")) if certs is not None else []
    proc = subprocess.Popen(cmd, env=flwr_env())
    stop = stop_on_signals()
    home = FlwrHome(f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}",
                    certs / "ca.crt" if certs is not None else None)
    try:
        _wait_ready(home, proc, timeout=60)
        if certs is not None:
            register_keys(home, keys, log)
        log(f"SuperLink ready on {host}:{port} ({'TLS, SuperNode authentication' if certs else 'INSECURE'}), "
            f"pid {proc.pid}; stop it with Ctrl-C or SIGTERM")
        if ready is not None:
            ready()
        while proc.poll() is None and not stop.requested:
            time.sleep(0.2)
    finally:
        terminate(proc)
        home.close()
        stop.restore()
    return 0 if stop.requested else int(proc.returncode or 0)
