"""What every deployment step shares: its error, Flower's commands from this environment, a private flwr CLI
home, starting and stopping child processes by PID (a Flower process dies with the fedgen command that runs it),
and the cleaning of Flower's output for a fedgen log."""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
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


# Flower's output, cleaned for a fedgen log: no colour codes (Flower colours its level names whether or not it
# writes to a terminal), and none of the lines that say nothing to a fedgen user
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_NOISE = [re.compile(pattern) for pattern in (
    r"\[uvicorn\.access\]",  # the SuperLink's HTTP access log: a line per request, several a second
    r'^INFO:\s+\S+:\d+ - "[A-Z]+ \S+ HTTP/[\d.]+" \d+',  # the SuperNode's (uvicorn's default format)
    # Flower's empty log lines (a blank line around each message a SuperNode handles), also as a ClientApp process
    # logs them where a library configured Python's root logger ("12/04/2026 19:28:37:INFO:")
    r"^(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:)?(DEBUG|INFO)\s*:\s*$",
    # Flower's shutdown, harmless under fedgen: the wrapper stops the whole process group after its Flower process
    r"SuperExec subprocess did not terminate within 1 second",
    # a key registered again (`fedgen flower register`, a restart with --state): fedgen says so in its own words
    r"Public key already in use",
    # flwr's deprecation notices for the Flower API fedgen does not call (it builds Messages itself), and for
    # command-line options fedgen does not pass
    r"DEPRECATED FEATURE: `Driver\.create_message` / `Grid\.create_message`",
    r"The `--appio-ssl-\S+` flag is deprecated",
)]


def clean_line(line: str) -> str | None:
    """`line` of a Flower process's output without colour codes, or None where fedgen drops it."""
    line = _ANSI.sub("", line.rstrip("\n"))
    return None if any(pattern.search(line) for pattern in _NOISE) else line


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> Callable[[], None] | None:
    """A Popen preexec_fn (Linux): the child gets SIGTERM when this process dies, SIGKILL included, so a killed
    fedgen command does not leave its Flower process running for minutes (Flower's own children watch their
    parent and follow). Elsewhere None: the wrapper still stops its child's group on every way out it sees."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between the fork and prctl: nobody would signal it
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class FlowerProcess:
    """A Flower command this fedgen command runs: in its own process group (a terminal's Ctrl-C reaches the
    wrapper, which stops it in order; `stop()` also ends what it started), dying with the wrapper (Linux:
    PR_SET_PDEATHSIG), its output cleaned (`clean_line`) and passed to `echo` by a thread as it comes. `output`
    keeps its last lines uncleaned but for colour, for explaining a failure."""

    def __init__(self, cmd: list[str], echo: Callable[[str], None], keep: int = 200, name: str | None = None):
        self.name = name or Path(cmd[0]).name
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=flwr_env(), process_group=0, preexec_fn=_die_with_parent())
        self.pid = self.proc.pid
        self._lines: deque[str] = deque(maxlen=keep)
        self._echo = echo
        self._pump = threading.Thread(target=self._read, name=f"{self.name} output", daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.append(strip_ansi(raw))
            line = clean_line(raw)
            if line is not None:
                self._echo(line)

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace: float = 15, group_grace: float = 5) -> int:
        """SIGTERM, SIGKILL after `grace` s; then whatever is left of its process group (Flower's own children,
        which leave by themselves once their parent is gone) gets `group_grace` s, then SIGKILL. Returns the exit
        status (negative: the signal that ended it)."""
        terminate(self.proc, grace)
        deadline = time.monotonic() + group_grace
        while time.monotonic() < deadline and _group_alive(self.pid):
            time.sleep(0.1)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._pump.join(timeout=2)  # the last lines of its output
        return self.proc.returncode

    def ended(self, said: str, stop: StopRequest, log: Callable[[str], None],
              explain: Callable[[str], str]) -> int:
        """A wrapper's one line on how it ended, "`said`: ...": 0 when it was asked to stop or its Flower process
        exited cleanly; otherwise a DeploymentError, with `explain(output)` where a failure's output says why
        (not for a process killed by a signal)."""
        if stop.requested:
            log(f"{said}: {stop.signal} received; {self.name} (pid {self.pid}) stopped")
            return 0
        if self.proc.returncode == 0:
            log(f"{said}: {self.how_it_ended()}")
            return 0
        if self.proc.returncode < 0:  # killed by a signal: its output says nothing about why
            raise DeploymentError(f"{said}: {self.how_it_ended()}")
        raise DeploymentError(f"{said}: {explain(self.output)}")

    def how_it_ended(self) -> str:
        code = self.proc.returncode
        if code is None:
            return f"{self.name} is running"
        if code < 0:
            try:
                return f"{self.name} was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"{self.name} was killed by signal {-code}"
        return f"{self.name} exited with status {code}"


def _group_alive(pgid: int) -> bool:
    """Whether a live process (a zombie waiting for its reaper is not) is in process group `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


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
        self.signal = ""  # the signal's name, once one came
        self._old = {}

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def stop_on_signals() -> StopRequest:
    """SIGINT/SIGTERM ask the serving loop to stop (and stop its child) instead of killing this process."""
    stop = StopRequest()

    def handler(signum, frame):
        stop.requested = True
        stop.signal = signal.Signals(signum).name

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
