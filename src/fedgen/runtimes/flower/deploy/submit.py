"""`fedgen train --runtime flower`: `flwr run` of a Flower app whose ServerApp and ClientApp are fedgen's installed
modules, with the resolved config; follows its log and returns when the run has finished, failing if the
ServerApp failed (a fedgen error with its message alone, as in-process; a bug with its traceback in the log
above); Ctrl-C stops the run on the SuperLink."""

from __future__ import annotations

import base64
import json
import selectors
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from fedgen import config as config_mod
from fedgen.config import Config
from fedgen.core.errors import FedgenError
from fedgen.federation.rundir import RunDir
from fedgen.runtimes.flower.deploy.common import (
    CONNECTION,
    DeploymentError,
    FlwrHome,
    flwr_bin,
    flwr_env,
    json_answer,
    last_lines,
    need_file,
    strip_ansi,
    terminate,
)

# between `flwr ls` calls while a run trains: each is a new Python process (about a second of CPU), which on a
# machine that also runs the SuperNodes competes with the training; the end of the log stream asks at once
STATUS_EVERY_S = 10.0
SERVERAPP_FAILED = "ServerApp failed with exception: "  # Flower's status details of a ServerApp that raised


class RunStopped(FedgenError):
    """`fedgen train --runtime flower` was interrupted (Ctrl-C) and stopped its run on the SuperLink."""

    exit_code = 130


APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedgen-app"
version = "1.0.0"
description = "fedgen's ServerApp and ClientApp, from the installed fedgen package"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedgen"

[tool.flwr.app.components]
serverapp = "fedgen.runtimes.flower.server_app:app"
clientapp = "fedgen.runtimes.flower.client_app:app"

[tool.flwr.app.config]
config-b64 = ""
out-dir = ""
"""


def submit(cfg: Config, out: Path, superlink: str, certs: Path | None, echo: Callable[[str], None] = print,
           connect_timeout: float = 60) -> str:
    """Start the run on the SuperLink and follow its log until it finishes; returns the run id. The ServerApp runs
    on the SuperLink's machine and writes the run directory `out` there (an absolute path)."""
    home = FlwrHome(superlink, need_file(certs / "ca.crt", "CA certificate") if certs is not None else None)
    try:
        app = home.path / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(APP_PYPROJECT)
        encoded = base64.b64encode(json.dumps(config_mod.to_dict(cfg)).encode()).decode()
        overrides = home.path / "run-config.toml"
        overrides.write_text(f'config-b64 = "{encoded}"\nout-dir = "{Path(out).resolve()}"\n')
        started = home.run("run", str(app), CONNECTION, "--run-config", str(overrides), "--format", "json",
                           timeout=connect_timeout)
        answer = json_answer(started.stdout)
        if "run-id" not in answer:
            why = answer.get("error-message") or last_lines(started.stdout + started.stderr)
            raise DeploymentError(f"could not start the run on the SuperLink at {superlink}: "
                                  + " ".join(str(why).split()))
        run_id = str(answer["run-id"])
        echo(f"run {run_id} started on the SuperLink at {superlink}; its log follows")
        follow = subprocess.Popen([flwr_bin("flwr"), "log", run_id, CONNECTION, "--stream"],
                                  env=flwr_env(FLWR_HOME=str(home.path)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = RunLog(echo)
        try:
            status = _follow(home, run_id, follow, log, superlink, cfg.runtime.link_timeout_s)
        except KeyboardInterrupt:
            _stop_run(home, run_id, Path(out), echo)
            raise RunStopped(f"interrupted: run {run_id} was stopped on the SuperLink; {out} keeps its last "
                             "complete round: rerun the same command to resume from it") from None
        finally:
            terminate(follow, grace=5)
        if status.get("status") != "finished:completed":
            details = str(status.get("status-details") or status.get("sub-status") or "")
            if log.fedgen_error and details.startswith(SERVERAPP_FAILED):  # said once, by the CLI, as in-process
                raise DeploymentError(details.removeprefix(SERVERAPP_FAILED))
            raise DeploymentError(f"run {run_id} ended {status.get('status')}: {details}")
        return run_id
    finally:
        home.close()


class RunLog:
    """The run's log as `fedgen train` echoes it: without colour codes and `flwr log`'s own lines, and without the
    ServerApp's `error:` line (a fedgen error: server_app.report_fedgen_error; its further lines are indented),
    which `submit` raises from the run's status instead, so that the CLI prints it once."""

    FLWR_LOG = ("Using SuperLink: ", "Starting logstream for run_id")

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.fedgen_error = False  # the ServerApp said a fedgen error
        self._in_error = False

    def __call__(self, raw: str) -> None:
        line = strip_ansi(raw.rstrip("\n"))
        if line.startswith("error: "):
            self.fedgen_error = self._in_error = True
            return
        if self._in_error and line.startswith("  "):
            return
        self._in_error = False
        if any(line.startswith(s) or line.split(":", 1)[-1].strip().startswith(s) for s in self.FLWR_LOG):
            return
        self.echo(line)


def _stop_run(home: FlwrHome, run_id: str, out: Path, echo: Callable[[str], None], wait_s: float = 90) -> None:
    """`flwr stop` the run, then wait (where the run directory is on this machine) until its ServerApp has let go
    of it: Flower tells a ServerApp that its run was stopped at its next call to the SuperLink."""

    echo(f"interrupted: stopping run {run_id} on the SuperLink (flwr stop)")
    try:
        done = home.run("stop", run_id, CONNECTION, "--format", "json", timeout=30)
    except DeploymentError as exc:
        echo(f"could not stop run {run_id}: {exc}; stop it with `flwr stop {run_id}`")
        return
    if done.returncode != 0 and "already finished" not in (done.stdout + done.stderr):
        echo(f"could not stop run {run_id}: {last_lines(done.stdout + done.stderr, 2)}")
        return
    run = RunDir(out)
    if not (run.path / ".lock").exists():  # the run directory is on the SuperLink's machine, not here
        echo(f"run {run_id} stopped; its ServerApp ends at its next message to the SuperLink")
        return
    if run.wait_unlocked(wait_s):
        echo(f"run {run_id} stopped; its ServerApp has ended")
    else:
        echo(f"run {run_id} is stopped on the SuperLink, but its ServerApp still holds {out} after {wait_s:g}s")


def _follow(home: FlwrHome, run_id: str, follow: subprocess.Popen, echo: Callable[[str], None], superlink: str,
            patience_s: float) -> dict:
    """Echo the run's log while it runs; the run's own status (`flwr ls`) says when it ended and how. A SuperLink
    that does not answer for `patience_s` seconds is a DeploymentError (never a wait without end)."""

    sel = selectors.DefaultSelector()
    assert follow.stdout is not None
    sel.register(follow.stdout, selectors.EVENT_READ)

    def drain(seconds: float) -> None:
        """Echo the log for `seconds`, or until the log's stream ends (the run has ended: ask at once)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not sel.get_map():  # the stream ended earlier: ask every second
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
                return
            for _ in sel.select(timeout=min(0.2, seconds)):
                line = follow.stdout.readline()
                if not line:
                    sel.unregister(follow.stdout)
                    return
                echo(line.rstrip("\n"))

    answered, unanswered = time.monotonic(), 0
    while True:
        drain(STATUS_EVERY_S)
        status = _status(home, run_id, timeout=min(30.0, patience_s))
        if status is None:
            unanswered += 1
            # twice in a row, not once: one `flwr ls` on a loaded machine can take most of a short patience itself
            if unanswered >= 2 and time.monotonic() - answered > patience_s:
                raise DeploymentError(
                    f"the SuperLink at {superlink} has not answered for {patience_s:g}s (runtime.link_timeout_s) "
                    f"while run {run_id} was training; the run directory keeps its last complete round: once the "
                    "SuperLink is back, rerun the same command to resume")
            continue
        answered, unanswered = time.monotonic(), 0
        if str(status.get("status", "")).startswith("finished"):
            drain(2.0)  # the last lines of the log
            return status


def _status(home: FlwrHome, run_id: str, timeout: float = 60) -> dict | None:
    """The run's entry of `flwr ls`, or None if the SuperLink did not answer."""
    try:
        done = home.run("ls", CONNECTION, "--run-id", run_id, "--format", "json", timeout=timeout)
    except DeploymentError:
        return None
    runs = json_answer(done.stdout).get("runs")
    if done.returncode != 0 or runs is None:
        return None
    return runs[0] if runs else {}
