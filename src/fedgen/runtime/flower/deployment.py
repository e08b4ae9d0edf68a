"""`flower`: a SuperLink on the coordinating machine and one SuperNode per silo, with TLS and SuperNode
authentication by default (flwr 1.41).

- `write_certs`: a CA, the SuperLink's TLS certificate (for the names/addresses nodes will dial) and one EC
  P-384 key pair per node (OpenSSH format, what `flwr supernode register` and `--auth-supernode-private-key`
  take), made with `cryptography`.
- `serve_superlink`: runs `flower-superlink` (HTTPS on one port; no per-run dependency installation: runs use
  the installed fedgen), registers the nodes' public keys, and stops it (by PID) when it is stopped.
- `serve_supernode`: runs `flower-supernode` for one silo and turns its failures (unreachable SuperLink,
  certificate not trusted, key not registered) into one clear message.
- `submit`: `flwr run` of a Flower app whose ServerApp and ClientApp are fedgen's installed modules, with the
  resolved config; follows its log and returns when the run has finished, failing if the ServerApp failed.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedgen import config as config_mod
from fedgen.config import Config
from fedgen.errors import FedgenError
from fedgen.paths import silo_state_home

CONNECTION = "fedgen"


class DeploymentError(FedgenError):
    """A Flower deployment step failed; the message names the node, file or address."""


class RunStopped(FedgenError):
    """`fedgen train --runtime flower` was interrupted (Ctrl-C) and stopped its run on the SuperLink."""

    exit_code = 130


def _bin(name: str) -> str:
    """Flower's commands, from the environment fedgen runs in."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _env(**extra: str) -> dict[str, str]:
    """The environment for Flower's processes: they start further Flower commands by name (flower-superexec,
    flwr-serverapp, flwr-clientapp), so this environment's bin folder comes first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return os.environ | {"PATH": path} | extra


# ---------------------------------------------------------------------------------------------------------- certs


def write_certs(out: Path, nodes: int, hosts: list[str] | None = None, days: int = 365) -> list[Path]:
    """CA (ca.crt, ca.key), the SuperLink's certificate (superlink.crt, superlink.key) valid for localhost,
    127.0.0.1 and `hosts`, and node-1..node-N key pairs (node-i private, node-i.pub public)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    written: list[Path] = []

    def write(name: str, data: bytes, mode: int = 0o600) -> None:
        path = out / name
        path.write_bytes(data)
        path.chmod(mode)
        written.append(path)

    def pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedgen CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    write("ca.key", pem(ca_key))
    write("ca.crt", ca.public_bytes(serialization.Encoding.PEM), 0o644)

    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", *(hosts or [])]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (hosts or ["localhost"])[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    write("superlink.key", pem(key))
    write("superlink.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)

    for i in range(1, nodes + 1):
        node = ec.generate_private_key(ec.SECP384R1())
        write(f"node-{i}", node.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
        write(f"node-{i}.pub", node.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                              serialization.PublicFormat.OpenSSH), 0o644)
    return written


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DeploymentError(f"{what} {path} not found (make them with `fedgen flower certs --out DIR`)")
    return path


def check_node_key(key: Path) -> None:
    """The node's private key must be an EC key in OpenSSH format (what flower-supernode loads)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    _need(key, "node key")
    try:
        loaded = load_ssh_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise DeploymentError(f"{key} is not an OpenSSH private key ({exc})") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise DeploymentError(f"{key} is not an elliptic-curve key (SuperNode authentication needs EC)")


# ------------------------------------------------------------------------------------------------- the flwr CLI


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
        env = _env(FLWR_HOME=str(self.path))
        try:
            return subprocess.run([_bin("flwr"), *args], capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"`flwr {' '.join(args[:2])}` did not answer within {timeout:g}s") from None

    def close(self) -> None:
        self._dir.cleanup()


def _json(text: str) -> dict:
    """The JSON object in a `flwr ... --format json` answer (after any log lines), or {}."""
    try:
        return json.loads(text[text.index("{"):])
    except ValueError:
        return {}


def _last_lines(text: str, n: int = 6) -> str:
    return "\n".join(line for line in text.strip().splitlines()[-n:])


# -------------------------------------------------------------------------------------------------- SuperLink


def superlink_command(certs: Path | None, host: str, port: int, database: Path | None) -> list[str]:
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if database is not None:
        cmd += ["--database", str(database)]
    if certs is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-ca-certfile", str(_need(certs / "ca.crt", "CA certificate")),
            "--ssl-certfile", str(_need(certs / "superlink.crt", "SuperLink certificate")),
            "--ssl-keyfile", str(_need(certs / "superlink.key", "SuperLink key")), "--enable-supernode-auth"]


def register_keys(home: FlwrHome, keys: list[Path], log: Callable[[str], None]) -> None:
    for pub in keys:
        done = home.run("supernode", "register", str(pub), CONNECTION, "--format", "json")
        text = done.stdout + done.stderr
        if done.returncode == 0 and '"success": true' in text.replace("'", '"'):
            log(f"registered {pub.name}: node id {_node_id(text)}")
        elif "already" in text.lower():
            log(f"{pub.name} was registered before")
        else:
            raise DeploymentError(f"could not register {pub}: {_last_lines(text)}")


def _node_id(text: str) -> str:
    return str(_json(text).get("node-id", "?"))


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
    proc = subprocess.Popen(cmd, env=_env())
    stop = _stop_on_signals()
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
        _terminate(proc)
        home.close()
        stop.restore()
    return 0 if stop.requested else int(proc.returncode or 0)


class _StopRequest:
    def __init__(self):
        self.requested = False
        self._old = {}

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _stop_on_signals() -> _StopRequest:
    """SIGINT/SIGTERM ask the serving loop to stop (and stop its child) instead of killing this process."""
    stop = _StopRequest()

    def handler(signum, frame):
        stop.requested = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        stop._old[sig] = signal.signal(sig, handler)
    return stop


def _terminate(proc: subprocess.Popen, grace: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -------------------------------------------------------------------------------------------------- SuperNode


def supernode_command(superlink: str, certs: Path | None, key: Path | None, partition_id: int,
                      data: Path | None, port: int, max_wait_s: float, state_dir: Path | None) -> list[str]:
    node_config = f"partition-id={partition_id}"
    if data is not None:
        if not data.exists():
            raise DeploymentError(f"silo data {data} not found")
        node_config += f" data-path='{data.resolve()}'"
    node_config += f" state-dir='{Path(state_dir or silo_state_home()).resolve()}'"
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port), "--node-config", node_config,
           "--max-wait-time", f"{max_wait_s:g}"]
    if certs is None:
        return [*cmd, "--insecure"]
    if key is None:
        raise DeploymentError("SuperNode authentication is on: pass --key (a node key from `fedgen flower certs`)")
    check_node_key(key)
    return [*cmd, "--root-certificates", str(_need(certs / "ca.crt", "CA certificate")),
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
    return "flower-supernode failed:\n" + _last_lines(output, 10)


def serve_supernode(superlink: str, certs: Path | None, key: Path | None, partition_id: int, data: Path | None,
                    port: int = 9094, max_wait_s: float = 60, state_dir: Path | None = None,
                    echo: Callable[[str], None] = lambda line: print(line, end="")) -> int:
    """Run one SuperNode (one silo) until it is stopped; a failure to join is a DeploymentError."""
    cmd = supernode_command(superlink, certs, key, partition_id, data, port, max_wait_s, state_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=_env())
    stop = _stop_on_signals()
    seen: list[str] = []
    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while not stop.requested:
            if sel.select(timeout=0.5):
                line = proc.stdout.readline()
                if not line:  # the SuperNode exited
                    break
                echo(line)
                seen.append(line)
                del seen[:-200]
            elif proc.poll() is not None:
                break
    finally:
        _terminate(proc)
        stop.restore()
    proc.wait()
    if stop.requested or proc.returncode == 0:
        return 0
    raise DeploymentError(f"SuperNode for silo {partition_id}: "
                          + explain_supernode_failure("".join(seen), superlink, certs, key, max_wait_s))


# ----------------------------------------------------------------------------------------------- submitting a run

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
serverapp = "fedgen.runtime.flower.server_app:app"
clientapp = "fedgen.runtime.flower.client_app:app"

[tool.flwr.app.config]
config-b64 = ""
out-dir = ""
"""


def submit(cfg: Config, out: Path, superlink: str, certs: Path | None, echo: Callable[[str], None] = print,
           connect_timeout: float = 60) -> str:
    """Start the run on the SuperLink and follow its log until it finishes; returns the run id. The ServerApp runs
    on the SuperLink's machine and writes the run directory `out` there (an absolute path)."""
    home = FlwrHome(superlink, _need(certs / "ca.crt", "CA certificate") if certs is not None else None)
    try:
        app = home.path / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(APP_PYPROJECT)
        encoded = base64.b64encode(json.dumps(config_mod.to_dict(cfg)).encode()).decode()
        overrides = home.path / "run-config.toml"
        overrides.write_text(f'config-b64 = "{encoded}"\nout-dir = "{Path(out).resolve()}"\n')
        started = home.run("run", str(app), CONNECTION, "--run-config", str(overrides), "--format", "json",
                           timeout=connect_timeout)
        answer = _json(started.stdout)
        if "run-id" not in answer:
            why = answer.get("error-message") or _last_lines(started.stdout + started.stderr)
            raise DeploymentError(f"could not start the run on the SuperLink at {superlink}: "
                                  + " ".join(str(why).split()))
        run_id = str(answer["run-id"])
        echo(f"run {run_id} started on the SuperLink at {superlink}; its log follows")
        follow = subprocess.Popen([_bin("flwr"), "log", run_id, CONNECTION, "--stream"],
                                  env=_env(FLWR_HOME=str(home.path)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            status = _follow(home, run_id, follow, echo, superlink, cfg.runtime.link_timeout_s)
        except KeyboardInterrupt:
            _stop_run(home, run_id, Path(out), echo)
            raise RunStopped(f"interrupted: run {run_id} was stopped on the SuperLink; {out} keeps its last "
                             "complete round: rerun the same command to resume from it") from None
        finally:
            _terminate(follow, grace=5)
        if status.get("status") != "finished:completed":
            details = status.get("status-details") or status.get("sub-status") or ""
            raise DeploymentError(f"run {run_id} ended {status.get('status')}: {details}")
        return run_id
    finally:
        home.close()


def _stop_run(home: FlwrHome, run_id: str, out: Path, echo: Callable[[str], None], wait_s: float = 90) -> None:
    """`flwr stop` the run, then wait (where the run directory is on this machine) until its ServerApp has let go
    of it: Flower tells a ServerApp that its run was stopped at its next call to the SuperLink."""
    from fedgen.fl.rundir import RunDir

    echo(f"interrupted: stopping run {run_id} on the SuperLink (flwr stop)")
    try:
        done = home.run("stop", run_id, CONNECTION, "--format", "json", timeout=30)
    except DeploymentError as exc:
        echo(f"could not stop run {run_id}: {exc}; stop it with `flwr stop {run_id}`")
        return
    if done.returncode != 0 and "already finished" not in (done.stdout + done.stderr):
        echo(f"could not stop run {run_id}: {_last_lines(done.stdout + done.stderr, 2)}")
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
    import selectors

    sel = selectors.DefaultSelector()
    assert follow.stdout is not None
    sel.register(follow.stdout, selectors.EVENT_READ)

    def drain(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in sel.select(timeout=min(0.2, seconds)):
                line = follow.stdout.readline()
                if line:
                    echo(line.rstrip("\n"))

    answered = time.monotonic()
    while True:
        drain(3.0)
        status = _status(home, run_id, timeout=min(30.0, patience_s))
        if status is None:
            if time.monotonic() - answered > patience_s:
                raise DeploymentError(
                    f"the SuperLink at {superlink} has not answered for {patience_s:g}s (runtime.link_timeout_s) "
                    f"while run {run_id} was training; the run directory keeps its last complete round: once the "
                    "SuperLink is back, rerun the same command to resume")
            continue
        answered = time.monotonic()
        if str(status.get("status", "")).startswith("finished"):
            drain(2.0)  # the last lines of the log
            return status


def _status(home: FlwrHome, run_id: str, timeout: float = 60) -> dict | None:
    """The run's entry of `flwr ls`, or None if the SuperLink did not answer."""
    try:
        done = home.run("ls", CONNECTION, "--run-id", run_id, "--format", "json", timeout=timeout)
    except DeploymentError:
        return None
    runs = _json(done.stdout).get("runs")
    if done.returncode != 0 or runs is None:
        return None
    return runs[0] if runs else {}


# ------------------------------------------------------------------------------ a whole deployment on this machine


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
            proc = subprocess.Popen([_bin("fedgen"), "flower", *args], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.root, env=_env())
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
                raise DeploymentError(f"{name} did not say {text!r}:\n{_last_lines(self.log(name), 20)}")
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM each command, then SIGKILL whatever is left in its process group (Flower's own children too,
        also where the command itself was killed and left them)."""
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
