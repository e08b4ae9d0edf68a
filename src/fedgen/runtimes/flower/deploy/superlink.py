"""`fedgen flower superlink`: runs `flower-superlink` (HTTPS on one port; no per-run dependency installation: runs
use the installed fedgen; its output cleaned of colour codes and HTTP access lines), registers the nodes' public
keys, and stops it (by PID) when it is stopped; it takes `flower-superlink` with it however it ends (SIGKILL
included, on Linux)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from fedgen.runtimes.flower.deploy.common import (
    CONNECTION,
    DeploymentError,
    FlowerProcess,
    FlwrHome,
    flwr_bin,
    json_answer,
    last_lines,
    need_file,
    stop_on_signals,
    strip_ansi,
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


def check_public_key(pub: Path) -> None:
    """A node's public key must be an EC key in OpenSSH format (what `flwr supernode register` takes)."""
    if not pub.is_file():
        raise DeploymentError(f"public key {pub} not found")
    try:
        key = load_ssh_public_key(pub.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DeploymentError(f"{pub} is not an OpenSSH public key ({exc}): pass a node-i.pub of `fedgen flower "
                              "certs`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DeploymentError(f"{pub} is not an elliptic-curve key (SuperNode authentication needs EC)")


def register_keys(home: FlwrHome, keys: list[Path], log: Callable[[str], None]) -> None:
    """Register each public key with the SuperLink, a line per key ("registered node-1.pub as node id N", or that
    it was registered before); a key the SuperLink refuses is a DeploymentError naming the key and the reason."""
    for pub in keys:
        check_public_key(pub)
        done = home.run("supernode", "register", str(pub), CONNECTION, "--format", "json")
        answer = json_answer(done.stdout)
        if done.returncode == 0 and answer.get("success") is True:
            log(f"registered {pub.name} as node id {answer.get('node-id', '?')}")
            continue
        reason = _refusal(answer.get("error-message") or done.stdout + done.stderr)
        if "already in use" in reason.lower():
            log(f"{pub.name} was registered before (the SuperLink has a node with this key)")
        else:
            raise DeploymentError(f"the SuperLink refused {pub}: {reason}")


def _refusal(text: str) -> str:
    """The reason in a `flwr supernode register` refusal, without flwr's connection line, codes, boxes and help
    links: "Using SuperLink: ...\\n\\n[code: 23] Public key already in use." -> "Public key already in use."."""
    lines = []
    for line in strip_ansi(text).splitlines():
        line = line.strip().strip("│╭╮╰╯─ ").removeprefix("ERROR").strip(" :")
        if not line or line == "Error" or line.startswith(("Using SuperLink:", "For more information", "Exit Code:")):
            continue
        lines.append(re.sub(r"^\[code: \d+\]\s*", "", line))
    return " ".join(lines) or "no reason given"


def _wait_ready(home: FlwrHome, link: FlowerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if link.poll() is not None:
            raise DeploymentError(f"{link.how_it_ended()}:\n{last_lines(link.output, 10)}")
        if home.run("supernode", "ls", CONNECTION, timeout=20).returncode == 0:
            return
        time.sleep(0.5)
    raise DeploymentError(f"the SuperLink did not come up within {timeout:g}s")


def _print(line: str) -> None:
    print(line, flush=True)


def serve_superlink(certs: Path | None, host: str = "127.0.0.1", port: int = 8000, database: Path | None = None,
                    log: Callable[[str], None] = print, ready: Callable[[], None] | None = None,
                    echo: Callable[[str], None] = _print) -> int:
    """Run a SuperLink until this process is stopped (SIGINT/SIGTERM: exit status 0); register certs/node-*.pub
    first. `log` gets fedgen's lines, `echo` the SuperLink's own (cleaned) output. The SuperLink is stopped by PID
    on the way out, whatever happens, and the way out is said in one line ("SuperLink stopped: ..."); a SuperLink
    that ended by itself is a DeploymentError."""
    cmd = superlink_command(certs, host, port, database)
    keys = sorted(certs.glob("node-*.pub")) if certs is not None else []
    stop = stop_on_signals()
    home = FlwrHome(f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}",
                    certs / "ca.crt" if certs is not None else None)
    try:
        link = FlowerProcess(cmd, echo)
        try:
            _wait_ready(home, link, timeout=60)
            if certs is not None:
                register_keys(home, keys, log)
            log(f"SuperLink ready on {host}:{port} ({'TLS, SuperNode authentication' if certs else 'INSECURE'}), "
                f"pid {link.pid}; stop it with Ctrl-C or SIGTERM")
            if ready is not None:
                ready()
            while link.poll() is None and not stop.requested:
                time.sleep(0.2)
        finally:
            link.stop()
    finally:
        home.close()
        stop.restore()
    return link.ended("SuperLink stopped", stop, log,
                      lambda output: f"{link.how_it_ended()}:\n{last_lines(output, 10)}")
