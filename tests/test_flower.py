"""The Flower runtimes: messages, silos behind ClientApps, simulation and a real TLS + authenticated deployment on
127.0.0.1, each against the in-process runtime. Every process a test starts is stopped by PID."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file

from fedgen import config as C
from fedgen.fl.protocol import Failure, Reply, Request
from fedgen.fl.rundir import RunDir
from fedgen.fl.server import FedAvgServer
from fedgen.runtime.flower import codec
from fedgen.runtime.flower.client_app import handle
from fedgen.runtime.flower.deployment import LocalDeployment
from fedgen.runtime.local import train

QUIET = Console(file=io.StringIO())
BIN = Path(sys.executable).parent
FLOWER_PROCS = "flower-superlink|flower-supernode|flower-superexec|flwr-serverapp|flwr-clientapp|raylet|gcs_server"
# two silos, both sampled every round, one CPU thread per client: bit-identical across runtimes on CPU
OVERRIDES = ["fl.clients=2", "fl.clients_per_round=2", "train.cpu_threads=1", "log.loss_eval_samples=16"]


def _global(run_dir: Path, round_idx: int) -> dict:
    return load_file(run_dir / "checkpoints" / f"round_{round_idx:04d}" / "global.safetensors")


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _leftovers() -> str:
    return subprocess.run(["pgrep", "-a", "-f", FLOWER_PROCS], capture_output=True, text=True).stdout


@pytest.fixture(autouse=True)
def _in_a_flower_run(monkeypatch):
    """Messages are created inside a Flower run (they take its id); outside one, the tests give them a run id."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("flower") / "local"
    train(C.load("smoke", overrides=[*OVERRIDES, "fl.rounds=3"]), out, QUIET)
    return out


# ------------------------------------------------------------------------------------------------ messages


def test_messages_carry_weights_bit_exactly():
    gen = torch.Generator().manual_seed(0)
    state = {"f32": torch.randn(3, 4, generator=gen), "f64": torch.randn(5, generator=gen, dtype=torch.float64),
             "f16": torch.randn(2, 2, generator=gen).half(), "i64": torch.arange(7)}
    request = Request(3, "fit", {"global": state}, {"round": 4, "nested": {"a": [1, 2]}})
    message = codec.request_message(request, {"config": {"x": 1}, "id": "k"}, node_id=42, ttl=10.0, group="1")
    back, run = codec.decode_request(message)
    assert (back.silo, back.kind, back.config, run) == (3, "fit", request.config, {"config": {"x": 1}, "id": "k"})
    for k, v in state.items():
        assert back.arrays["global"][k].dtype == v.dtype and torch.equal(back.arrays["global"][k], v)
    reply = codec.decode_reply(codec.Message(codec._records({"local": state}, {"silo": 3, "config": {"n": 1}}),
                                             reply_to=message))
    assert reply.silo == 3 and reply.config == {"n": 1} and torch.equal(reply.arrays["local"]["f16"], state["f16"])


# ------------------------------------------------------------------------------------------------ screening


def _states(n: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(1)
    return [{"w": torch.randn(10, generator=gen) * scale, "b": torch.zeros(2)} for _ in range(n)]


def test_server_rejects_unusable_updates_and_names_the_client():
    base = {"w": torch.zeros(10), "b": torch.zeros(2)}
    server = FedAvgServer(6, 6, 0, base)
    good = _states(6)
    nan = dict(good[1], w=good[1]["w"].clone())
    nan["w"][3] = float("nan")
    replies = {
        0: Reply(0, {"local": good[0]}, {"num_examples": 10}),
        1: Reply(1, {"local": nan}, {"num_examples": 10}),
        2: Reply(2, {"local": {"w": torch.zeros(10)}}, {"num_examples": 10}),
        3: Reply(3, {"local": {"w": torch.zeros(11), "b": torch.zeros(2)}}, {"num_examples": 10}),
        4: Failure(4, "node 77: Flower error 5: node unavailable"),
        5: Reply(5, {"local": good[5]}, {"num_examples": 30}),
    }
    screened = server.screen([0, 1, 2, 3, 4, 5], replies)
    assert sorted(screened.accepted) == [0, 5]
    assert "not finite (NaN/Inf in w)" in screened.rejected[1]
    assert "other keys" in screened.rejected[2] and "other shapes" in screened.rejected[3]
    assert "node unavailable" in screened.rejected[4]
    assert server.screen([0, 9], {0: replies[0]}).rejected == {9: "no reply"}
    out = server.aggregate(screened.accepted)
    torch.testing.assert_close(out["w"], (good[0]["w"] * 10 + good[5]["w"] * 30) / 40)


def test_server_rejects_an_update_far_outside_the_rounds_others():
    base = {"w": torch.zeros(10), "b": torch.zeros(2)}
    server = FedAvgServer(4, 4, 0, base, max_update_norm_ratio=10.0)
    states = _states(4)
    states[2] = {"w": states[2]["w"] * 50, "b": torch.zeros(2)}  # a scaled (poisoned or broken) update
    replies = {i: Reply(i, {"local": s}, {"num_examples": 5}) for i, s in enumerate(states)}
    screened = server.screen([0, 1, 2, 3], replies)
    assert sorted(screened.accepted) == [0, 1, 3] and "x the median of the round's others" in screened.rejected[2]
    states[2] = {"w": states[2]["w"] / 50 * 3, "b": torch.zeros(2)}  # 3x: within the limit
    replies[2] = Reply(2, {"local": states[2]}, {"num_examples": 5})
    assert sorted(server.screen([0, 1, 2, 3], replies).accepted) == [0, 1, 2, 3]


def test_round_completes_with_survivors_or_stops_per_min_clients(tmp_path, monkeypatch):
    from fedgen.runtime import local as local_mod
    from fedgen.runtime.loop import TrainingAborted

    real_send = local_mod.InProcessPool.send

    def silo_1_dies_in_round_2(self, requests, timeout, progress=None):
        replies = real_send(self, [q for q in requests if not (q.silo == 1 and q.config.get("round") == 1)],
                            timeout, progress)
        return replies | {1: Failure(1, "no reply within 5s")} if any(q.config.get("round") == 1 for q in requests) \
            else replies

    monkeypatch.setattr(local_mod.InProcessPool, "send", silo_1_dies_in_round_2)
    out = tmp_path / "survivors"
    train(C.load("smoke", overrides=[*OVERRIDES, "fl.rounds=2"]), out, QUIET)
    record = [r for r in RunDir(out).read_metrics() if r["event"] == "round"][-1]
    assert record["aggregated"] == [0] and record["rejected"] == {"1": "no reply within 5s"}
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingAborted, match=r"round 2 aborted: 1 of 2 clients .* fl.min_clients=2 .*client 1: no "
                                              r"reply within 5s.*checkpoint .* is round 1"):
        train(C.load("smoke", overrides=[*OVERRIDES, "fl.rounds=2", "fl.min_clients=2"]), stopped, QUIET)
    assert RunDir(stopped).committed_rounds() == [1]


# ------------------------------------------------------------------------------------------------ silo side


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_a_silo_whose_data_has_other_classes_refuses_the_run(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "silo" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "silo" / cls / f"{i}.png")
    cfg = C.load("smoke", overrides=["data.dataset=image-folder", "data.image_size=8", "data.channels=1"])
    run = {"config": C.to_dict(cfg), "id": "test"}
    describe = Request(-1, "describe", config={"classes": [str(k) for k in range(10)], "image_shape": [1, 8, 8]})
    msg = codec.request_message(describe, run, node_id=7, ttl=10.0, group="0")
    node = {"partition-id": 1, "data-path": str(tmp_path / "silo"), "state-dir": str(tmp_path / "state")}
    reply = codec.decode_reply(handle(msg, _context(node)))
    assert reply.silo == 1
    assert "silo 1: its data has classes ['cat', 'dog'], the run has ['0'," in reply.config["error"]
    wrong_shape = Request(-1, "describe", config={"classes": ["cat", "dog"], "image_shape": [1, 16, 16]})
    reply = codec.decode_reply(handle(codec.request_message(wrong_shape, run, 7, 10.0, "0"), _context(node)))
    assert "its images are [1, 8, 8] (C, H, W), the run's are [1, 16, 16]" in reply.config["error"]
    no_silo = codec.decode_reply(handle(msg, _context({})))
    assert "no partition-id in its node config" in no_silo.config["error"]


# ------------------------------------------------------------------------------------------------ simulation


def test_simulation_equals_in_process_and_leaves_no_ray_behind(tmp_path):
    """SCAFFOLD on flower-sim: each virtual client keeps its control variate in its own state directory across
    rounds and messages, and the run equals the in-process one bit for bit."""
    from fedgen.runtime.flower.simulation import train_simulation

    scaffold = [*OVERRIDES, "fl.rounds=2", "fl.strategy=scaffold"]
    in_process = tmp_path / "local"
    train(C.load("smoke", overrides=scaffold), in_process, QUIET)
    out = tmp_path / "sim"
    train_simulation(C.load("smoke", overrides=[*scaffold, "runtime.sim_cpus=2"]), out, QUIET)
    _assert_same(_global(out, 2), _global(in_process, 2))
    control = [torch.load(d / "checkpoints" / "round_0002" / "optimizer.pt")["scaffold_control"]
               for d in (out, in_process)]
    _assert_same(*control)
    assert any(float(v.abs().max()) > 0 for v in control[0].values())
    records = RunDir(out).read_metrics()
    assert records[0]["runtime"] == "flower-sim"
    local_rounds = [r for r in RunDir(in_process).read_metrics() if r["event"] == "round"][:2]
    for sim, local in zip([r for r in records if r["event"] == "round"], local_rounds, strict=True):
        assert sim["local_train_loss"] == local["local_train_loss"]  # computed by the silos, identically
        assert sim["global_client_loss"] == local["global_client_loss"]
        assert sim["global_test_loss_at"] == "server"
    time.sleep(1)
    assert "raylet" not in _leftovers() and "gcs_server" not in _leftovers()


# ------------------------------------------------------------------------------------------------ deployment


def _train_on(superlink: str, certs: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "fedgen"), "train", "--runtime", "flower", "--superlink", superlink, "--certs", str(certs),
           "--preset", "smoke", "--out", str(out), *[a for o in [*OVERRIDES, *overrides] for a in ("--set", o)]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400)


def test_deployment_with_tls_and_authentication(in_process, tmp_path):
    """A SuperLink and two SuperNodes on 127.0.0.1 (TLS, registered node keys) train two rounds of `smoke` equal to
    in-process; a third round with one SuperNode killed completes with the survivor; bad certificates and an
    unregistered key are clear errors; every process is stopped."""
    certs = tmp_path / "certs"
    subprocess.run([str(BIN / "fedgen"), "flower", "certs", "--out", str(certs), "--nodes", "3"], check=True,
                   capture_output=True)
    other = tmp_path / "other-certs"
    subprocess.run([str(BIN / "fedgen"), "flower", "certs", "--out", str(other), "--nodes", "1"], check=True,
                   capture_output=True)
    (certs / "node-3.pub").unlink()  # node-3's key is never registered
    port = 18000 + os.getpid() % 1000
    dep = LocalDeployment(tmp_path, port)
    superlink = dep.superlink
    try:
        dep.start_superlink(certs)
        for silo in (0, 1):
            dep.start_supernode(certs, silo, certs / f"node-{silo + 1}")
        out = tmp_path / "fed"
        # no per-round loss evaluation: half the message rounds (it does not change the weights)
        done = _train_on(superlink, certs, out, "fl.rounds=2", "log.loss_eval_samples=0")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        _assert_same(_global(out, 2), _global(in_process, 2))
        assert RunDir(out).read_metrics()[0]["runtime"] == "flower"

        # an unregistered key, and a CA that did not sign the SuperLink's certificate: each a clear error
        bad = subprocess.run([str(BIN / "fedgen"), "flower", "supernode", "--superlink", superlink, "--certs",
                              str(certs), "--key", str(certs / "node-3"), "--partition-id", "1", "--port",
                              str(port + 5)], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "is not registered there" in " ".join(bad.stderr.split())
        bad = subprocess.run([str(BIN / "fedgen"), "flower", "supernode", "--superlink", superlink, "--certs",
                              str(other), "--key", str(certs / "node-2"), "--partition-id", "1", "--port",
                              str(port + 6)], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "TLS: the SuperLink at" in " ".join(bad.stderr.split())

        # silo 1's SuperNode dies; round 3 completes with silo 0 alone
        node1 = subprocess.run(["pgrep", "-f", f"flower-supernode.*--port {port + 2}"], capture_output=True,
                               text=True).stdout.split()
        assert len(node1) == 1
        os.kill(int(node1[0]), signal.SIGKILL)
        done = _train_on(superlink, certs, out, "fl.rounds=3", "log.loss_eval_samples=0",
                         "runtime.round_timeout_s=15",
                         "runtime.wait_for_nodes_s=2")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        last = [r for r in RunDir(out).read_metrics() if r["event"] == "round"][-1]
        assert last["round"] == 3 and last["aggregated"] == [0] and "1" in last["rejected"]
        assert dep.procs["node1"].wait(30) == 1  # its fedgen command reports the failure
        assert "SuperNode for silo 1" in dep.log("node1")
    finally:
        dep.stop()
    time.sleep(1)
    assert not _leftovers(), _leftovers()


def test_unreachable_superlink_is_a_clear_error_in_bounded_time(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run([str(BIN / "fedgen"), "flower", "certs", "--out", str(certs), "--nodes", "1"], check=True,
                   capture_output=True)
    node = subprocess.run([str(BIN / "fedgen"), "flower", "supernode", "--superlink", "127.0.0.1:9", "--certs",
                           str(certs), "--key", str(certs / "node-1"), "--partition-id", "0", "--max-wait", "3",
                           "--port", "19994"], capture_output=True, text=True, timeout=60)
    assert node.returncode == 1
    assert "could not reach the SuperLink at 127.0.0.1:9 within 3s" in " ".join(node.stderr.split())
    run = subprocess.run([str(BIN / "fedgen"), "train", "--runtime", "flower", "--superlink", "127.0.0.1:9",
                          "--certs", str(certs), "--preset", "smoke", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "could not start the run on the SuperLink at 127.0.0.1:9" in \
        " ".join(run.stderr.split())
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--certs", "{tmp}/none", "--key", "{tmp}/none/node-1"], "node key {tmp}/none/node-1 not found"),
    (["--certs", "{tmp}", "--key", "{tmp}/garbage"], "is not an OpenSSH private key"),
    (["--certs", "{tmp}"], "SuperNode authentication is on: pass --key"),
    (["--insecure", "--data", "{tmp}/missing"], "silo data {tmp}/missing not found"),
])
def test_supernode_bad_input(tmp_path, args, message):
    (tmp_path / "garbage").write_text("not a key")
    (tmp_path / "ca.crt").write_text("")
    argv = [a.format(tmp=tmp_path) for a in args]
    done = subprocess.run([str(BIN / "fedgen"), "flower", "supernode", "--superlink", "127.0.0.1:9",
                           "--partition-id", "0", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and message.format(tmp=tmp_path) in " ".join(done.stderr.split())


def test_certs_are_what_flower_loads(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    from fedgen.runtime.flower.deployment import check_node_key, write_certs

    write_certs(tmp_path, 2, ["silo-gateway.example.org", "10.1.2.3"])
    cert = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "silo-gateway.example.org"} <= set(names.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    for i in (1, 2):
        check_node_key(tmp_path / f"node-{i}")
        assert load_ssh_public_key((tmp_path / f"node-{i}.pub").read_bytes()).curve.name == "secp384r1"
    assert oct((tmp_path / "ca.key").stat().st_mode)[-3:] == "600"
