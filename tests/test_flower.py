"""The Flower runtimes: messages, silos behind ClientApps, simulation and a real TLS + authenticated deployment on
127.0.0.1, each against the in-process runtime. Every process a test starts is stopped by PID."""

import io
import json
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
from fedgen.algorithms.feddm.screening import FedAvgServer
from fedgen.core.records import Failure, Reply, Request
from fedgen.federation.rundir import RunDir
from fedgen.runtimes.flower import codec
from fedgen.runtimes.flower.client_app import handle
from fedgen.runtimes.flower.deploy.local import LocalDeployment
from fedgen.runtimes.local import train

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


def _running(name: str) -> list[str]:
    """Live processes whose command line has `name` (an exited one its parent has not reaped yet is not)."""
    return [line for line in _leftovers().splitlines() if name in line and "<defunct>" not in line]


def _leftovers() -> str:
    return subprocess.run(["pgrep", "-a", "-f", FLOWER_PROCS], capture_output=True, text=True).stdout


@pytest.fixture(autouse=True)
def _in_a_flower_run(monkeypatch):
    """Messages are created inside a Flower run (they take its id); outside one, the tests give them a run id."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


# ------------------------------------------------------------------------------------------------ messages


def test_messages_carry_weights_bit_exactly():
    gen = torch.Generator().manual_seed(0)
    state = {"f32": torch.randn(3, 4, generator=gen), "f64": torch.randn(5, generator=gen, dtype=torch.float64),
             "f16": torch.randn(2, 2, generator=gen).half(), "i64": torch.arange(7),
             "bf16": torch.randn(3, generator=gen).bfloat16(), "i8": torch.tensor([-127, 0, 127], dtype=torch.int8),
             "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    request = Request(3, "fit", {"global": state, "none": {}}, {"round": 4, "nested": {"a": [1, 2]}})
    message = codec.request_message(request, {"config": {"x": 1}, "id": "k"}, node_id=42, ttl=10.0, group="1")
    # each tensor dict is one Array (one object to store and transfer), not one per tensor
    assert [len(message.content.array_records[k]) for k in ("arrays.global", "arrays.none")] == [1, 1]
    back, run = codec.decode_request(message)
    assert (back.silo, back.kind, back.config, run) == (3, "fit", request.config, {"config": {"x": 1}, "id": "k"})
    assert back.arrays["none"] == {} and list(back.arrays["global"]) == list(state)
    for k, v in state.items():
        got = back.arrays["global"][k]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    with pytest.raises(ValueError, match="packed tensors: 74 bytes, the index accounts for 165"):
        codec.unpack(codec.pack(state)[0][:74], codec.pack(state)[1])
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
    from fedgen.federation.loop import TrainingAborted
    from fedgen.runtimes import local as local_mod

    real_send = local_mod.InProcessPool.send

    def silo_1_dies_in_round_2(self, requests, timeout, progress=None):
        replies = real_send(self, [q for q in requests if not (q.silo == 1 and q.config.get("round") == 1)],
                            timeout, progress)
        return replies | {1: Failure(1, "no reply within 5s")} if any(q.config.get("round") == 1 for q in requests) \
            else replies

    monkeypatch.setattr(local_mod.InProcessPool, "send", silo_1_dies_in_round_2)
    out = tmp_path / "survivors"
    train(C.load("tiny", overrides=[*OVERRIDES, "fl.rounds=2"]), out, QUIET)
    record = [r for r in RunDir(out).read_metrics() if r["event"] == "round"][-1]
    assert record["aggregated"] == [0] and record["rejected"] == {"1": "no reply within 5s"}
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingAborted, match=r"round 2 aborted: 1 of 2 clients .* fl.min_clients=2 .*client 1: no "
                                              r"reply within 5s.*checkpoint .* is round 1"):
        train(C.load("tiny", overrides=[*OVERRIDES, "fl.rounds=2", "fl.min_clients=2"]), stopped, QUIET)
    assert RunDir(stopped).committed_rounds() == [1]


# ------------------------------------------------------------------------------------------------ silo side


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_a_silo_whose_data_has_other_classes_refuses_the_run(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "silo" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "silo" / cls / f"{i}.png")
    cfg = C.load("tiny", overrides=["data.dataset=image-folder", "data.image_size=8", "data.channels=1"])
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


# DP-SGD (noise from each silo's secret) with SCAFFOLD (client variates in each silo's store): all the silo state
# an extension must keep. The secrets are pinned so that runs on different runtimes draw the same noise.
DP_SCAFFOLD = [*OVERRIDES, "fl.strategy=scaffold", "privacy.mode=dp-sgd", "privacy.noise_multiplier=1.0",
               "privacy.accountant=rdp", "data.max_train_samples=200"]  # 200 images: DP steps cost seconds each
PGA_DP = ["fl.clients=2", "pga.discriminators=[\"dcgan\", \"mlp\"]", "pga.steps_per_round=1", "train.cpu_threads=1",
          "privacy.mode=dp-sgd", "privacy.noise_multiplier=1.0", "privacy.accountant=rdp", "data.max_train_samples=200"]


def _pin_secrets(state_root: Path, silos=(0, 1)) -> None:
    for s in silos:
        (state_root / f"silo_{s:03d}").mkdir(parents=True, exist_ok=True)
        (state_root / f"silo_{s:03d}" / "noise_secret").write_text(str(1234567 + s))


def _ledger(run_dir: Path) -> dict:
    """Per silo: (steps, epsilon) of the run's last privacy record."""
    parties = RunDir(run_dir).round_records()[-1]["privacy"]["parties"]
    return {s: (rep["steps"], rep["epsilon"]) for s, rep in parties.items()}


@pytest.fixture(scope="module")
def extended_reference(tmp_path_factory):
    """In-process, uninterrupted: the DP-SGD + SCAFFOLD run 3 rounds, the DP PGA run 2 rounds."""
    root = tmp_path_factory.mktemp("reference")
    feddm, pga = root / "feddm", root / "pga"
    for out, preset, overrides, rounds in ((feddm, "tiny", DP_SCAFFOLD, 3), (pga, "pga-smoke", PGA_DP, 2)):
        _pin_secrets(out / "silos")
        train(C.load(preset, overrides=[*overrides, f"fl.rounds={rounds}"]), out, QUIET)
    return feddm, pga


def test_an_extended_run_on_simulation_keeps_every_silos_state(extended_reference, tmp_path, monkeypatch):
    """flower-sim: DP-SGD + SCAFFOLD trained 2 rounds, then extended to 3 with another runtime.round_timeout_s,
    equals the same run trained 3 rounds in-process (weights, server variate, per-silo steps and epsilon); a DP
    PGA run extended by a round equals its in-process twin. The virtual silos keep their state in the run
    directory, as in-process silos do; no Ray process outlives the runs."""
    from fedgen.runtimes.flower.simulation import train_simulation

    feddm_ref, pga_ref = extended_reference
    monkeypatch.setenv("FEDGEN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sim"
    _pin_secrets(out / "silos")
    sim = ["runtime.sim_cpus=2"]
    train_simulation(C.load("tiny", overrides=[*DP_SCAFFOLD, *sim, "fl.rounds=2"]), out, QUIET)
    train_simulation(C.load("tiny", overrides=[*DP_SCAFFOLD, *sim, "fl.rounds=3", "runtime.round_timeout_s=300"]),
                     out, QUIET)
    _assert_same(_global(out, 3), _global(feddm_ref, 3))
    control = [torch.load(d / "checkpoints" / "round_0003" / "optimizer.pt")["scaffold_control"]
               for d in (out, feddm_ref)]
    _assert_same(*control)
    assert any(float(v.abs().max()) > 0 for v in control[0].values())
    assert _ledger(out) == _ledger(feddm_ref) and all(steps > 0 for steps, _ in _ledger(out).values())
    assert RunDir(out).read_metrics()[0]["runtime"] == "flower-sim"
    accounts = sorted((out / "silos").rglob("round_0003.pt"))  # in the run directory, never in a cache
    assert [p.parent.name for p in accounts] == ["silo_000", "silo_001"] and not (tmp_path / "cache").exists()
    assert all(r["global_test_loss_at"] == "server" for r in RunDir(out).round_records())
    # `fedgen audit` of a run trained on Flower: its partition.json holds the silos' counts only; the members are
    # recomputed from the config, as each silo computed its share
    audited = subprocess.run([str(BIN / "fedgen"), "audit", str(out), "--n", "20", "--generated", "20",
                              "--timesteps", "1", "--draws", "1"], capture_output=True, text=True, timeout=300)
    assert audited.returncode == 0, audited.stderr[-3000:]
    record = [r for r in RunDir(out).read_metrics() if r["event"] == "audit"][-1]
    assert record["members"] == 20 and record["dp_epsilon"] == RunDir(out).round_records()[-1]["privacy"]["epsilon"]

    pga = tmp_path / "pga"
    _pin_secrets(pga / "silos")
    train_simulation(C.load("pga-smoke", overrides=[*PGA_DP, *sim, "fl.rounds=1"]), pga, QUIET)
    train_simulation(C.load("pga-smoke", overrides=[*PGA_DP, *sim, "fl.rounds=2", "runtime.round_timeout_s=300"]),
                     pga, QUIET)
    _assert_same(_global(pga, 2), _global(pga_ref, 2))
    assert _ledger(pga) == _ledger(pga_ref)
    time.sleep(1)
    assert "raylet" not in _leftovers() and "gcs_server" not in _leftovers()


def test_dp_merf_on_simulation_equals_in_process(tmp_path):
    """DP-MERF on flower-sim (the release travels as a Flower message of its own type, QUERY.merf): the same
    generator and ledger as in-process, each silo asked once."""
    from fedgen.runtimes.flower.simulation import train_simulation

    runs = {}
    for name in ("local", "sim"):
        out = tmp_path / name
        _pin_secrets(out / "silos")
        cfg = C.load("merf-smoke", overrides=["fl.clients=2", "train.cpu_threads=1", "runtime.sim_cpus=2"])
        (train if name == "local" else train_simulation)(cfg, out, QUIET)
        runs[name] = out
    _assert_same(_global(runs["sim"], 2), _global(runs["local"], 2))
    # the same account; PRV's epsilon, computed in another process (a Ray worker), may differ in the last digits
    sim, local = _ledger(runs["sim"]), _ledger(runs["local"])
    assert sim.keys() == local.keys() and all(sim[s][0] == local[s][0] == 1 for s in sim)
    assert all(sim[s][1] == pytest.approx(local[s][1], rel=1e-12) for s in sim)
    assert [r["clients"] for r in RunDir(runs["sim"]).round_records()] == [[0, 1], []]
    assert RunDir(runs["sim"]).read_metrics()[0]["runtime"] == "flower-sim"


# ------------------------------------------------------------------------------------------------ deployment


def _train_cmd(superlink: str, certs: Path, out: Path, preset: str, *overrides: str) -> list[str]:
    return [str(BIN / "fedgen"), "train", "--runtime", "flower", "--superlink", superlink, "--certs", str(certs),
            "--preset", preset, "--out", str(out), *[a for o in overrides for a in ("--set", o)]]


def _train_on(superlink: str, certs: Path, out: Path, preset: str, *overrides: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_train_cmd(superlink, certs, out, preset, *overrides), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _new_run(out: Path, states: list[Path]) -> None:
    """Create `out` with a known run id and pin each SuperNode's noise secret under it (equal noise to the
    in-process reference)."""
    out.mkdir(parents=True)
    run_id = f"test-{out.name}"
    (out / "run.json").write_text(json.dumps({"run_id": run_id}))
    for silo, state in enumerate(states):
        _pin_secrets(state / run_id, silos=(silo,))


def _wait_for_round(out: Path, round_idx: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["round"] == round_idx for r in RunDir(out).round_records()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"round {round_idx} not recorded within {timeout}s"
        time.sleep(0.3)


def _silo_folders(root: Path, per_class: int = 6) -> list[Path]:
    """Two silos' own image folders (root/<class>/*.png) of scikit-learn digits, disjoint."""
    from sklearn.datasets import load_digits

    d = load_digits()
    folders = [root / f"silo{s}" for s in (0, 1)]
    for k in range(10):
        images = d.images[d.target == k][: 2 * per_class]
        for s, folder in enumerate(folders):
            (folder / str(k)).mkdir(parents=True)
            for i, img in enumerate(images[s * per_class:(s + 1) * per_class]):
                Image.fromarray(np.rint(img * 255 / 16).astype(np.uint8)).save(folder / str(k) / f"{i}.png")
    return folders


def test_deployment_with_tls_and_authentication(extended_reference, tmp_path):
    """A SuperLink and SuperNodes on 127.0.0.1 (TLS, registered node keys, a --state folder each):
    - on fedgen's fast path (short waits, a node worker): DP-SGD + SCAFFOLD trained 2 rounds, then (silo 1's
      worker killed and restarted between) extended to 3 with another round timeout, equals the in-process run of
      3 rounds (weights, server variate, per-silo steps and epsilon), and `fedgen audit` reads it;
    - on Flower's stock SuperNodes (--no-fast) with the same state folders, a DP PGA run extended by a round
      equals its in-process twin;
    - SuperNodes that each read their own --data folder train a run; Ctrl-C stops it on the SuperLink (no
      ServerApp left) and the rerun gives one record per round;
    - a round with one SuperNode killed completes with the survivor;
    - killing the SuperLink mid-run ends `fedgen train` with an error in bounded time, and the ServerApp lets go
      of the run directory (`fedgen audit` of a Flower run: the simulation test);
    bad certificates and an unregistered key are clear errors; every process is stopped."""
    feddm_ref, pga_ref = extended_reference
    certs = tmp_path / "certs"
    subprocess.run([str(BIN / "fedgen"), "flower", "certs", "--out", str(certs), "--nodes", "7"], check=True,
                   capture_output=True)
    other = tmp_path / "other-certs"
    subprocess.run([str(BIN / "fedgen"), "flower", "certs", "--out", str(other), "--nodes", "1"], check=True,
                   capture_output=True)
    (certs / "node-3.pub").unlink()  # node-3's key is never registered
    port = 18000 + os.getpid() % 1000
    dep = LocalDeployment(tmp_path, port)
    superlink = dep.superlink
    states = [tmp_path / f"state{silo}" for silo in (0, 1)]
    try:
        dep.start_superlink(certs)
        for silo in (0, 1):
            dep.start_supernode(certs, silo, certs / f"node-{silo + 1}", "--state", str(states[silo]))

        # DP-SGD + SCAFFOLD, extended (no per-round loss evaluation: half the message rounds, same weights)
        out = tmp_path / "fed"
        _new_run(out, states)
        _train_on(superlink, certs, out, "tiny", *DP_SCAFFOLD, "fl.rounds=2", "log.loss_eval_samples=0")
        # silo 1's node worker dies between the runs: its restart reloads the silo's state from the --state folder
        worker = subprocess.run(["pgrep", "-f", f"node_worker --runtime-api-address 127.0.0.1:{port + 2}"],
                                capture_output=True, text=True).stdout.split()
        assert len(worker) == 1
        os.kill(int(worker[0]), signal.SIGKILL)
        _train_on(superlink, certs, out, "tiny", *DP_SCAFFOLD, "fl.rounds=3", "log.loss_eval_samples=0",
                  "runtime.round_timeout_s=120")
        assert "node worker for silo 1 ended" in dep.log("node1")
        _assert_same(_global(out, 3), _global(feddm_ref, 3))
        _assert_same(*[torch.load(d / "checkpoints" / "round_0003" / "optimizer.pt")["scaffold_control"]
                       for d in (out, feddm_ref)])
        assert _ledger(out) == _ledger(feddm_ref)
        assert RunDir(out).read_metrics()[0]["runtime"] == "flower"
        assert sorted(p.name for p in (states[0] / "test-fed").iterdir()) == ["silo_000"]  # keyed by the run id

        # Flower's stock SuperNodes (--no-fast) for the same two silos, with their state folders
        for silo in (0, 1):
            dep.procs[f"node{silo}"].send_signal(signal.SIGTERM)
            assert dep.procs[f"node{silo}"].wait(30) == 0
            dep.start(f"stock{silo}", "supernode", "--superlink", superlink, "--certs", str(certs), "--key",
                      str(certs / f"node-{silo + 6}"), "--partition-id", str(silo), "--port", str(port + 9 + silo),
                      "--state", str(states[silo]), "--no-fast")

        # a DP PGA run on the stock SuperNodes, extended by a round
        pga = tmp_path / "pga"
        _new_run(pga, states)
        _train_on(superlink, certs, pga, "pga-smoke", *PGA_DP, "fl.rounds=1")
        _train_on(superlink, certs, pga, "pga-smoke", *PGA_DP, "fl.rounds=2", "runtime.round_timeout_s=120")
        _assert_same(_global(pga, 2), _global(pga_ref, 2))
        assert _ledger(pga) == _ledger(pga_ref)

        # an unregistered key, and a CA that did not sign the SuperLink's certificate: each a clear error
        bad = subprocess.run([str(BIN / "fedgen"), "flower", "supernode", "--superlink", superlink, "--certs",
                              str(certs), "--key", str(certs / "node-3"), "--partition-id", "1", "--port",
                              str(port + 5)], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "is not registered there" in " ".join(bad.stderr.split())
        bad = subprocess.run([str(BIN / "fedgen"), "flower", "supernode", "--superlink", superlink, "--certs",
                              str(other), "--key", str(certs / "node-2"), "--partition-id", "1", "--port",
                              str(port + 6)], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "TLS: the SuperLink at" in " ".join(bad.stderr.split())

        # two new SuperNodes on the fast path, each with its own data folder (the coordinator holds none of it)
        for silo in (0, 1):
            dep.procs[f"stock{silo}"].send_signal(signal.SIGTERM)
            assert dep.procs[f"stock{silo}"].wait(30) == 0
        folders = _silo_folders(tmp_path / "own-data")
        for silo in (0, 1):
            dep.start(f"own{silo}", "supernode", "--superlink", superlink, "--certs", str(certs), "--key",
                      str(certs / f"node-{silo + 4}"), "--partition-id", str(silo), "--port", str(port + 7 + silo),
                      "--data", str(folders[silo]), "--state", str(tmp_path / f"own-state{silo}"))
        own = tmp_path / "own"
        image_folder = [*OVERRIDES, "data.dataset=image-folder", "data.image_size=8", "data.channels=1",
                        "log.loss_eval_samples=0", "runtime.link_timeout_s=10"]

        # Ctrl-C in round 2: the run stops on the SuperLink; the rerun gives one record per round
        # (a terminal's Ctrl-C; a shell's background job, such as a CI step, inherits SIGINT ignored)
        proc = subprocess.Popen(_train_cmd(superlink, certs, own, "tiny", *image_folder, "fl.rounds=3"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        _wait_for_round(own, 1, proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=150)
        assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
        assert "was stopped on the SuperLink" in " ".join(stderr.split()) and "Traceback" not in stderr
        assert "ServerApp has ended" in stdout, stdout[-2000:]
        deadline = time.monotonic() + 30  # it has let go of the run directory; its process is on its way out
        while _running("flwr-serverapp") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _running("flwr-serverapp")
        _train_on(superlink, certs, own, "tiny", *image_folder, "fl.rounds=3")
        raw = [json.loads(line) for line in (own / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in raw if r["event"] == "round"] == [1, 2, 3]
        from fedgen.data.sources import load_dataset

        sizes = [len(load_dataset("image-folder", f, image_size=8, channels=1).train.labels) for f in folders]
        assert RunDir(own).read_metrics()[0]["client_sizes"] == sizes
        assert all(r["aggregated"] == [0, 1] for r in RunDir(own).round_records())

        # silo 1's SuperNode dies: the next round completes with silo 0 alone; then the SuperLink dies mid-run,
        # and `fedgen train` ends with a clear error in bounded time
        node1 = subprocess.run(["pgrep", "-f", f"short_waits.*--port {port + 8}"], capture_output=True,
                               text=True).stdout.split()
        assert len(node1) == 1
        os.kill(int(node1[0]), signal.SIGKILL)
        dead = [*image_folder, "runtime.round_timeout_s=30", "runtime.wait_for_nodes_s=2"]
        proc = subprocess.Popen(_train_cmd(superlink, certs, own, "tiny", *dead, "fl.rounds=100"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_round(own, 4, proc)
        last = RunDir(own).round_records()[-1]
        assert last["round"] == 4 and last["aggregated"] == [0] and "1" in last["rejected"]
        assert dep.procs["own1"].wait(30) == 1  # its fedgen command reports the failure
        assert "SuperNode for silo 1" in dep.log("own1")
        link = subprocess.run(["pgrep", "-f", f"flower-superlink.*--port {port}"], capture_output=True,
                              text=True).stdout.split()
        assert len(link) == 1
        os.kill(int(link[0]), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "has not answered for 10s (runtime.link_timeout_s)" in " ".join(
            stderr.split()), stderr[-2000:]
        assert time.monotonic() - killed < 90
        assert RunDir(own).wait_unlocked(90)  # the orphaned ServerApp gave up too: the rerun can take the run
    finally:
        dep.stop()
    # the ServerApp orphaned by the SuperLink's SIGKILL (a child of its SuperExec, not of fedgen) runs Flower's
    # exit handler after it lets go of the run directory: it must be gone within a minute
    deadline = time.monotonic() + 60
    while [line for line in _leftovers().splitlines() if "<defunct>" not in line] and time.monotonic() < deadline:
        time.sleep(1)
    assert not [line for line in _leftovers().splitlines() if "<defunct>" not in line], _leftovers()


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
                          "--certs", str(certs), "--preset", "tiny", "--out", str(tmp_path / "r")],
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

    from fedgen.runtimes.flower.deploy.certs import check_node_key, write_certs

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


def test_flower_sim_output_is_fedgens_own(tmp_path):
    """What Flower's simulation engine and Ray add is kept out of a fedgen log: no deprecation notice for the
    engine fedgen chose, no Ray FutureWarning, no colour codes or actor lines, no known-harmless warnings."""
    fedgen = str(Path(sys.executable).parent / "fedgen")
    done = subprocess.run([fedgen, "train", "--preset", "tiny", "--runtime", "flower-sim", "--set", "fl.rounds=1",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert "round 1/1:" in output and "done: samples in" in output
    for noise in ("\x1b[", "DEPRECATED", "Warning", "ClientAppActor", "DEBUG"):
        assert noise not in output, output


def test_known_harmless_warnings_are_filtered_and_others_shown():
    import warnings

    from fedgen.core.warnings import quiet_known_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("__array__ implementation doesn't accept a copy keyword, so passing copy=False failed.",
                      DeprecationWarning, stacklevel=1)
        warnings.warn("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices",
                      FutureWarning, stacklevel=1)
        warnings.warn("something fedgen does not know", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something fedgen does not know"]


# ------------------------------------------------------------------------------------- many virtual clients


def test_two_hundred_virtual_clients_train_as_in_process(tmp_path):
    """flower-sim with N = 200 virtual silos (K = 5 a round, IID, one thread) trains bit for bit what in-process
    does: every virtual node is described at start (through the one-pass delivery, each actor slicing its silos'
    shares from one cached split), then only the K selected silos work each round."""
    from fedgen.runtimes.flower.simulation import train_simulation

    cfg = C.load("tiny", overrides=["fl.clients=200", "fl.clients_per_round=5", "data.partition=iid", "fl.rounds=2",
                                    "train.cpu_threads=1", "log.loss_eval_samples=16"])
    train(cfg, tmp_path / "local", QUIET)
    train_simulation(cfg, tmp_path / "sim", QUIET)
    for r in (1, 2):
        _assert_same(_global(tmp_path / "local", r), _global(tmp_path / "sim", r))
    sim, local = RunDir(tmp_path / "sim").round_records(), RunDir(tmp_path / "local").round_records()
    assert [len(rec["aggregated"]) for rec in sim] == [5, 5]
    assert [(r["clients"], r["aggregated"], r["local_train_loss"]) for r in sim] == \
        [(r["clients"], r["aggregated"], r["local_train_loss"]) for r in local]
    assert not _running("raylet") and not _running("gcs_server")


def test_compressed_updates_on_simulation_equal_in_process(tmp_path):
    """fl.compression=int8 over Flower messages (int8 tensors and float32 scales in ArrayRecords, each virtual
    silo's error-feedback residual in its store) trains what in-process trains, bit for bit, and sends the same
    bytes. Three silos, two a round (seed 3: silo 2 sits out round 2, so its round-1 residual feeds round 3)."""
    from fedgen.runtimes.flower.simulation import train_simulation

    cfg = C.load("tiny", overrides=["fl.clients=3", "fl.clients_per_round=2", "fl.rounds=3", "fl.compression=int8",
                                    "train.seed=3", "train.cpu_threads=1", "log.loss_eval_samples=16"])
    train(cfg, tmp_path / "local", QUIET)
    train_simulation(cfg, tmp_path / "sim", QUIET)
    _assert_same(_global(tmp_path / "local", 3), _global(tmp_path / "sim", 3))
    sim, local = RunDir(tmp_path / "sim").round_records(), RunDir(tmp_path / "local").round_records()
    assert [(r["bytes_up"], r["compression"]) for r in sim] == [(r["bytes_up"], r["compression"]) for r in local]
    assert len({s for r in sim for s in r["clients"]}) == 3 and not _running("raylet")


def test_the_delivery_fedgen_installs_is_written_for_this_flower():
    """sim_delivery replaces a private function of Flower 1.41.0: this fails the day Flower or the functions it stands
    for change, so the replacement is re-checked (and PINNED_SOURCES updated) rather than kept blindly."""
    from fedgen.runtimes.flower import sim_delivery

    assert sim_delivery.flower_matches() is None
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    with sim_delivery.patched_delivery() as installed:
        assert installed and vce_api.add_messages_to_queue is sim_delivery.deliver_pending
    assert vce_api.add_messages_to_queue is original


def test_the_deployment_fast_path_is_written_for_this_flower(monkeypatch):
    """The fast path relies on private code of Flower 1.41.0 (the SuperNode loop's waits, the SuperExec loop and
    flwr-clientapp's task handling the node worker mirrors, the pulls it retries sooner): each pinned by source
    hash, so an upgrade fails here instead of running code that no longer matches. `install` puts the short waits
    and the prompt pulls in place."""
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    from fedgen.runtimes.flower import server_app
    from fedgen.runtimes.flower.deploy import node_worker, short_waits
    from fedgen.runtimes.flower.pins import mismatch

    assert node_worker.flower_matches() is None and short_waits.flower_matches() is None
    assert mismatch({"http_grid.HttpGrid.pull_messages": server_app.PULL_MESSAGES_SOURCE},
                    {"http_grid.HttpGrid.pull_messages": http_grid.HttpGrid.pull_messages}, "") is None
    assert "changed" in mismatch({"f": "0" * 64}, {"f": test_the_deployment_fast_path_is_written_for_this_flower}, "")
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    monkeypatch.setattr(start_client_internal, "pull_objects", start_client_internal.pull_objects)
    assert short_waits.install()
    assert isinstance(start_client_internal.time, short_waits.ShortWaits)
    assert start_client_internal.pull_objects.keywords == {"initial_backoff": short_waits.PULL_FIRST_S,
                                                           "backoff_cap": short_waits.PULL_CAP_S}


def test_short_waits_back_off_while_idle_and_reset_when_a_message_is_answered(monkeypatch):
    from fedgen.runtimes.flower.deploy import short_waits

    slept = []
    monkeypatch.setattr(short_waits.time, "sleep", slept.append)
    waits = short_waits.ShortWaits(idle_min_s=0.02, local_s=0.01)
    for _ in range(10):
        waits.sleep(3)  # Flower's idle wait: no message at the SuperLink
    assert slept == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 3, 3]
    slept.clear()
    waits.sleep(0.5)  # Flower's wait for the ClientApp's reply: a message is being answered
    waits.sleep(3)
    waits.sleep(0.25)  # any other wait is Flower's own
    assert slept == [0.01, 0.02, 0.25] and waits.monotonic() > 0


def test_the_node_secret_is_readable_by_its_user_alone():
    from fedgen.runtimes.flower.deploy.supernode import _new_secret

    (folder, path), (other_folder, other) = _new_secret(), _new_secret()
    try:
        assert len(path.read_bytes()) == 32 and path.read_bytes() != other.read_bytes()
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    finally:
        folder.cleanup()
        other_folder.cleanup()
    assert not path.exists()


def test_a_killed_node_worker_is_a_failed_silo_for_its_round_and_comes_back(tmp_path):
    """Two SuperNodes on the fast path (TLS, authenticated). Silo 1's node worker is killed during round 2's fit:
    round 2 completes with silo 0 alone (after runtime.round_timeout_s); `fedgen flower supernode` starts a new
    worker, which takes silo 1's messages again once Flower has expired the dead task (two missed task
    heartbeats), and the last round aggregates both silos."""
    certs = tmp_path / "certs"
    subprocess.run([str(BIN / "fedgen"), "flower", "certs", "--out", str(certs), "--nodes", "2"], check=True,
                   capture_output=True)
    port = 17000 + os.getpid() % 1000
    out = tmp_path / "run"
    with LocalDeployment(tmp_path, port) as dep:
        dep.start_superlink(certs)
        for silo in (0, 1):
            dep.start_supernode(certs, silo, certs / f"node-{silo + 1}", "--state", str(tmp_path / f"state{silo}"))
        proc = subprocess.Popen(_train_cmd(dep.superlink, certs, out, "tiny", *OVERRIDES, "fl.rounds=4",
                                           "fl.local_epochs=30", "log.loss_eval_samples=0",
                                           "runtime.round_timeout_s=60"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_round(out, 1, proc)
        time.sleep(3)  # round 2's fit is under way on both silos (30 local epochs: several seconds)
        worker = subprocess.run(["pgrep", "-f", f"node_worker --runtime-api-address 127.0.0.1:{port + 2}"],
                                capture_output=True, text=True).stdout.split()
        assert len(worker) == 1
        os.kill(int(worker[0]), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
        said = "node worker for silo 1 ended (fedgen-node-worker was killed by SIGKILL); starting it again"
        assert said in dep.log("node1")
    records = RunDir(out).round_records()
    assert records[0]["aggregated"] == [0, 1] and records[1]["aggregated"] == [0]
    assert "1" in records[1]["rejected"] and records[-1]["aggregated"] == [0, 1]


def _ray_processes() -> set[int]:
    """Live processes of Ray anywhere on the machine: its actors and workers ("ray::..."), raylet, gcs_server."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and ("ray::" in cmdline or "raylet" in cmdline or "gcs_server" in cmdline):
            found.add(int(entry))
    return found


@pytest.mark.parametrize("stop", [None, signal.SIGINT, signal.SIGTERM])
def test_no_ray_process_outlives_fedgen_train_on_simulation(tmp_path, stop):
    """`fedgen train --runtime flower-sim` ends (finished, Ctrl-C, SIGTERM) with no Ray process left: the signals
    are sent once the first round is under way, when Ray's actors are busy."""
    before = _ray_processes()
    out = tmp_path / "r"
    proc = subprocess.Popen([str(BIN / "fedgen"), "train", "--preset", "tiny", "--runtime", "flower-sim", "--out",
                             str(out), "--set", "fl.rounds=30", "--set", "train.cpu_threads=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # its own group (the test's Ctrl-C is not the run's), and Ctrl-C's default action, as
                            # in a terminal: a test run in the background inherits SIGINT ignored
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        if stop is not None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None and not (
                    (out / "metrics.jsonl").exists() and '"event": "round"' in (out / "metrics.jsonl").read_text()):
                time.sleep(0.5)
            assert proc.poll() is None, proc.stdout.read()
            assert _ray_processes() - before, "Ray was not running during the round"
            proc.send_signal(stop)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == (0 if stop is None else 130), output
    if stop is not None:
        assert "error: interrupted: " in output and "keeps its last complete round" in output, output
    deadline = time.monotonic() + 30  # a process that is ending gets a moment
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes() - before, subprocess.run(["ps", "-ef"], capture_output=True, text=True).stdout
