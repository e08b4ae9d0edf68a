"""A whole deployment on this machine (tests, benchmarks): a SuperLink and SuperNodes started as `fedgen flower`
commands on 127.0.0.1, each in its own process group, all stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from fedgen.runtimes.flower.deploy.common import DeploymentError, flwr_bin, flwr_env, last_lines


class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1, started through fedgen's own commands, each in its own process
    session with its log in `root`; `stop()` ends them by PID (SIGTERM; SIGKILL after 30 s). For tests,
    benchmarks and trying a deployment out on one machine."""

    def __init__(self, root: Path, port: int = 8000):
        self.root = Path(root)
        self.port = port
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def superlink(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{name}.log", "w") as log:
            proc = subprocess.Popen([flwr_bin("fedgen"), "flower", *args], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.root, env=flwr_env())
        self.procs[name] = proc
        return proc

    def start_superlink(self, certs: Path, timeout: float = 120) -> None:
        self.start("superlink", "superlink", "--certs", str(certs), "--port", str(self.port))
        self.wait_for("superlink", "SuperLink ready", timeout)

    def start_supernode(self, certs: Path, silo: int, key: Path, *extra: str) -> None:
        self.start(f"node{silo}", "supernode", "--superlink", self.superlink, "--certs", str(certs), "--key",
                   str(key), "--partition-id", str(silo), "--port", str(self.port + 1 + silo), *extra)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def wait_for(self, name: str, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise DeploymentError(f"{name} did not say {text!r}:\n{last_lines(self.log(name), 20)}")
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM each command (it stops its Flower process and that one's children, each group of its own), then
        SIGKILL whatever is left in the command's process group. A command killed outright takes its Flower process
        with it (PR_SET_PDEATHSIG: deploy.common.FlowerProcess)."""
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
