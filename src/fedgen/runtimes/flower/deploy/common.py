"""What every deployment step shares: its error, Flower's commands from this environment, a private flwr CLI
home, and starting and stopping child processes by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from fedgen.core.errors import FedgenError

CONNECTION = "fedgen"


class DeploymentError(FedgenError):
    """A Flower deployment step failed; the message names the node, file or address."""


def flwr_bin(name: str) -> str:
    """Flower's commands, from the environment fedgen runs in."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def flwr_env(**extra: str) -> dict[str, str]:
    """The environment for Flower's processes: they start further Flower commands by name (flower-superexec,
    flwr-serverapp, flwr-clientapp), so this environment's bin folder comes first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return os.environ | {"PATH": path} | extra




class FlwrHome:
    """A private FLWR_HOME holding one connection, `fedgen`, to the SuperLink (the flwr CLI reads connections
    from $FLWR_HOME/config.toml); nothing is written to the user's ~/.flwr."""

    def __init__(self, superlink: str, ca: Path | None):
        self._dir = tempfile.TemporaryDirectory(prefix="fedgen-flwr-")
        self.path = Path(self._dir.name)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{superlink}"']
        lines.append(f'root-certificates = "{Path(ca).resolve()}"' if ca else "insecure = true")
        (self.path / "config.toml").write_text("\n".join(lines) + "\n")

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = flwr_env(FLWR_HOME=str(self.path))
        try:
            return subprocess.run([flwr_bin("flwr"), *args], capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"`flwr {' '.join(args[:2])}` did not answer within {timeout:g}s") from None

    def close(self) -> None:
        self._dir.cleanup()


def json_answer(text: str) -> dict:
    """The JSON object in a `flwr ... --format json` answer (after any log lines), or {}."""
    try:
        return json.loads(text[text.index("{"):])
    except ValueError:
        return {}


def last_lines(text: str, n: int = 6) -> str:
    return "\n".join(line for line in text.strip().splitlines()[-n:])


class StopRequest:
    def __init__(self):
        self.requested = False
        self._old = {}

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def stop_on_signals() -> StopRequest:
    """SIGINT/SIGTERM ask the serving loop to stop (and stop its child) instead of killing this process."""
    stop = StopRequest()

    def handler(signum, frame):
        stop.requested = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        stop._old[sig] = signal.signal(sig, handler)
    return stop


def terminate(proc: subprocess.Popen, grace: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DeploymentError(f"{what} {path} not found (make them with `fedgen flower certs --out DIR`)")
    return path
