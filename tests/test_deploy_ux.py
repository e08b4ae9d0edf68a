"""What a user of a Flower deployment sees: fedgen's errors as one line (no traceback, no Flower exit-code help),
SuperNodes that do not fit the run named with the run's count, wrappers that take their Flower processes with
them when killed, key registration in words, logs without colour codes or HTTP access lines. Every process a
test starts is stopped by PID."""

import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from rich.console import Console

from fedgen import config as C
from fedgen.core.errors import FedgenError
from fedgen.federation.rundir import RunDir
from fedgen.runtimes.flower.client_app import handle
from fedgen.runtimes.flower.deploy.common import clean_line
from fedgen.runtimes.flower.deploy.local import LocalDeployment
from fedgen.runtimes.flower.deploy.submit import RunLog
from fedgen.runtimes.flower.server_app import flower_federation, make_server_app

BIN = Path(sys.executable).parent
QUIET = Console(file=io.StringIO())


@pytest.fixture(autouse=True)
def _in_a_flower_run(monkeypatch):
    """Messages are created inside a Flower run (they take its id); outside one, the tests give them a run id."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def flwr_log():
    """Flower's logger, as its console handler would print it (exception tracebacks included); the filters a test
    adds to it are removed afterwards."""
    logger = logging.getLogger("flwr")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(handler)
    filters = list(logger.filters)
    yield out
    logger.removeHandler(handler)
    logger.filters[:] = filters


class InProcessGrid:
    """A Flower Grid whose nodes are ClientApps in this process (`handle`), each with its own node config."""

    def __init__(self, nodes: dict[int, dict]):
        self.nodes = nodes
        self.replies = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for i, message in enumerate(messages):
            mid = f"m{len(self.replies)}-{i}"
            message.metadata.__dict__["_message_id"] = mid
            node = message.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config=self.nodes[node], state=RecordDict(), run_config={})
            self.replies[mid] = handle(message, context)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(mid) for mid in ids if mid in self.replies]


def _federation(tmp_path, grid, clients: int):
    cfg = C.load("tiny", overrides=[f"fl.clients={clients}", f"fl.clients_per_round={clients}",
                                     "runtime.wait_for_nodes_s=0.5", "runtime.round_timeout_s=30"])
    return flower_federation(grid, cfg, RunDir(tmp_path / "run"), torch.device("cpu"), QUIET, "flower")


# ------------------------------------------------------------------------------------------------ silo <-> SuperNode


def test_a_supernode_outside_the_run_says_so_in_its_log_and_the_coordinator_names_the_count(tmp_path, capsys):
    grid = InProcessGrid({11: {"partition-id": 0}, 15: {"partition-id": 5}})
    with pytest.raises(FedgenError) as caught, _federation(tmp_path, grid, clients=2):
        pass
    assert str(caught.value) == ("the SuperNode of silo 5 (node 15) refused the run: --partition-id 5 is outside the "
                                 "run's silos 0..1 (fl.clients=2): start this SuperNode with --partition-id 0..1")
    node_log = capsys.readouterr().out.splitlines()
    assert [line for line in node_log if line.startswith("error:")] == [
        "error: silo 5 refused run 1 (describe): --partition-id 5 is outside the run's silos 0..1 (fl.clients=2): "
        "start this SuperNode with --partition-id 0..1"]


def test_too_few_supernodes_is_one_error_with_the_count(tmp_path):
    grid = InProcessGrid({11: {"partition-id": 0}, 12: {"partition-id": 1}})
    with pytest.raises(FedgenError) as caught, _federation(tmp_path, grid, clients=4):
        pass
    assert str(caught.value) == (
        "2 SuperNodes answered (silos 0, 1) within 0.5s (runtime.wait_for_nodes_s), the run has fl.clients=4: start "
        "one SuperNode per silo, --partition-id 0..3 (missing: silos 2, 3)")
    with pytest.raises(FedgenError, match=r"^no SuperNode answered within 0.5s .*fl.clients=2: start one SuperNode "
                                          r"per silo, --partition-id 0..1 \(missing: silos 0, 1\)$"), \
            _federation(tmp_path, InProcessGrid({}), clients=2):
        pass


def test_supernode_refuses_a_negative_partition_id_before_starting_anything(tmp_path):
    done = subprocess.run([str(BIN / "fedgen"), "flower", "supernode", "--superlink", "127.0.0.1:9", "--insecure",
                           "--partition-id", "-1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "--partition-id is this silo's number, 0..N-1 for a run of fl.clients=N silos: it cannot be negative, " \
           "got -1" in " ".join(done.stderr.split())
    assert "Starting Flower SuperNode" not in done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------ the ServerApp


def _deployed_context(tmp_path, *overrides: str) -> Context:
    cfg = C.load("tiny", overrides=["fl.clients=2", "fl.clients_per_round=2", "runtime.wait_for_nodes_s=0.5",
                                     *overrides])
    encoded = base64.b64encode(json.dumps(C.to_dict(cfg)).encode()).decode()
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                   run_config={"config-b64": encoded, "out-dir": str(tmp_path / "run")})


def _as_flower_reports(app, grid, context) -> None:
    """What flwr 1.41's `run_serverapp` does with an exception of the ServerApp: logs it with its traceback, then
    `flwr_exit` logs the exit code's help."""
    from flwr.supercore import log
    from flwr.supercore.exit.exit_code import EXIT_CODE_HELP, ExitCode

    try:
        app(grid=grid, context=context)
    except Exception as ex:  # noqa: BLE001 - as Flower does
        log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=ex)
        code = ExitCode.SERVERAPP_EXCEPTION
        log(logging.ERROR, f"Exit Code: {code}\n{EXIT_CODE_HELP[code]}")


def test_a_deployed_serverapp_says_a_fedgen_error_in_one_line_and_a_bug_with_its_traceback(tmp_path, capsys,
                                                                                          flwr_log):
    _as_flower_reports(make_server_app(), InProcessGrid({11: {"partition-id": 0}}), _deployed_context(tmp_path))
    out = capsys.readouterr().out + flwr_log.getvalue()
    assert [line for line in out.splitlines() if line.startswith("error:")] == [
        "error: 1 SuperNode answered (silo 0) within 0.5s (runtime.wait_for_nodes_s), the run has fl.clients=2: "
        "start one SuperNode per silo, --partition-id 0..1 (missing: silo 1)"]
    assert "Traceback" not in out and "Exit Code" not in out and "raised an exception" not in out

    class Broken(InProcessGrid):
        def get_node_ids(self):
            raise ZeroDivisionError("a bug")

    flwr_log.truncate(0)
    _as_flower_reports(make_server_app(), Broken({}), _deployed_context(tmp_path / "bug"))
    out = capsys.readouterr().out + flwr_log.getvalue()
    assert "Traceback" in out and "ZeroDivisionError: a bug" in out and "Exit Code: 201" in out
    assert not [line for line in out.splitlines() if line.startswith("error:")]


def test_the_followed_log_holds_back_the_serverapps_error_and_drops_colour():
    echoed = []
    log = RunLog(echoed.append)
    for line in ["Using SuperLink: fedgen (127.0.0.1:9)",
                 "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `7`",
                 "\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process", "waiting for 2 SuperNodes (up to 5s)",
                 "error: SuperNodes refused the run", "  node 1: other classes", "after"]:
        log(line + "\n")
    assert echoed == ["INFO :      Start `flwr-serverapp` process", "waiting for 2 SuperNodes (up to 5s)", "after"]
    assert log.fedgen_error


def test_flower_output_is_cleaned_for_a_fedgen_log():
    assert clean_line("\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\n") == \
        "INFO :      Starting Flower SuperNode"
    for noise in ['2026-12-04T18:37:10.112Z INFO [uvicorn.access] 127.0.0.1:45372 - "POST /v1/control/list-nodes '
                  'HTTP/1.1" 200', 'INFO:     127.0.0.1:52880 - "POST /v1/fleet/pull-messages HTTP/1.1" 200 OK',
                  "\x1b[92mINFO \x1b[0m:      ", "12/04/2026 19:28:37:INFO:",
                  "\x1b[93mWARNING \x1b[0m:   SuperExec subprocess did not terminate within 1 second."]:
        assert clean_line(noise) is None, noise
    assert clean_line("\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 0.26 seconds") is not None


# ------------------------------------------------------------------------------------------------ a deployment


def _children(pid: int) -> list[int]:
    done = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while [p for p in pids if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _flower_tree(wrapper: int) -> list[int]:
    """The processes a fedgen wrapper runs and their children: a stock Flower process and its SuperExec, or on
    the fast path a SuperNode and its node worker (the first one listed is the Flower process)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        started = _children(wrapper)
        below = [p for child in started for p in _children(child)]
        if len(started) >= 2 or below:
            return [*started, *below]
        time.sleep(0.3)
    raise AssertionError(f"no Flower process under {wrapper}")


def _train(dep: LocalDeployment, certs: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedgen"), "train", "--runtime", "flower", "--superlink", dep.superlink,
                           "--certs", str(certs), "--preset", "tiny", "--out", str(out),
                           *[a for o in ["fl.clients=2", "fl.clients_per_round=2", "runtime.wait_for_nodes_s=3",
                                         *overrides] for a in ("--set", o)]],
                          capture_output=True, text=True, timeout=300)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    both = done.stdout + done.stderr
    assert done.returncode == 1, both[-3000:]
    assert "Traceback" not in both and "Exit Code" not in both and "\x1b[" not in both, both[-3000:]
    errors = [line for line in both.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, both[-3000:]
    return errors[0]


def test_a_deployment_as_its_user_sees_it(tmp_path):
    """TLS SuperLink and SuperNodes on 127.0.0.1: `fedgen flower register` in words; a run with too few SuperNodes
    and one with a SuperNode outside the run each end in exactly one `error:` line (no traceback, no Flower exit
    code); a SuperNode whose flower-supernode is killed says so; a SIGKILLed wrapper (SuperNode, SuperLink) takes
    its Flower processes with it within seconds; the logs have no colour codes and no HTTP access lines."""
    certs = tmp_path / "certs"
    subprocess.run([str(BIN / "fedgen"), "flower", "certs", "--out", str(certs), "--nodes", "3"], check=True,
                   capture_output=True)
    later = tmp_path / "node-3.pub"
    (certs / "node-3.pub").rename(later)  # registered with the running SuperLink, below
    (tmp_path / "garbage.pub").write_text("not a key")
    port = 17000 + os.getpid() % 1000
    dep = LocalDeployment(tmp_path / "dep", port)
    try:
        dep.start_superlink(certs)
        dep.start_supernode(certs, 0, certs / "node-1")

        def register(pub: Path) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "fedgen"), "flower", "register", str(pub), "--superlink", dep.superlink,
                                   "--certs", str(certs)], capture_output=True, text=True, timeout=120)

        first, again, garbage = register(later), register(later), register(tmp_path / "garbage.pub")
        assert first.returncode == 0 and first.stdout.startswith("registered node-3.pub as node id "), first
        assert int(first.stdout.split()[-1]) > 0 and "{" not in first.stdout
        assert again.returncode == 0 and again.stdout.strip() == \
            "node-3.pub was registered before (the SuperLink has a node with this key)", again
        assert garbage.returncode == 1 and "garbage.pub is not an OpenSSH public key" in garbage.stderr, garbage

        line = _one_error_line(_train(dep, certs, tmp_path / "few"))
        assert line == ("error: 1 SuperNode answered (silo 0) within 3s (runtime.wait_for_nodes_s), the run has "
                        "fl.clients=2: start one SuperNode per silo, --partition-id 0..1 (missing: silo 1)")

        dep.start("node5", "supernode", "--superlink", dep.superlink, "--certs", str(certs), "--key",
                  str(certs / "node-2"), "--partition-id", "5", "--port", str(port + 6), "--no-fast")
        dep.wait_for("node5", "Starting Flower SuperExec", 120)  # Flower's stock SuperNode (node 0: the fast path)
        line = _one_error_line(_train(dep, certs, tmp_path / "outside"))
        assert line.startswith("error: the SuperNode of silo 5 (node ") and line.endswith(
            "refused the run: --partition-id 5 is outside the run's silos 0..1 (fl.clients=2): start this SuperNode "
            "with --partition-id 0..1"), line
        assert "error: silo 5 refused run " in dep.log("node5")

        # flower-supernode killed: its wrapper says so and fails
        node5 = _flower_tree(dep.procs["node5"].pid)
        os.kill(node5[0], signal.SIGKILL)
        assert dep.procs["node5"].wait(60) == 1
        assert "SuperNode for silo 5 stopped: flower-supernode was killed by SIGKILL" in dep.log("node5")
        assert not _gone_within(node5, 30)

        # a wrapper killed outright takes its Flower processes with it
        for name in ("node0", "superlink"):
            flower = _flower_tree(dep.procs[name].pid)
            os.kill(dep.procs[name].pid, signal.SIGKILL)
            assert not _gone_within(flower, 30), (name, subprocess.run(["ps", "-o", "pid,stat,args", "-p",
                                                                        ",".join(map(str, flower))],
                                                                       capture_output=True, text=True).stdout)
        for name in ("superlink", "node0", "node5"):
            log = dep.log(name)
            assert "\x1b[" not in log and "uvicorn.access" not in log and '"POST /v1/' not in log, (name, log)
        assert "registered node-1.pub as node id " in dep.log("superlink")
    finally:
        dep.stop()
