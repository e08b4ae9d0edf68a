"""Compressed transport of FedDM updates (fl.compression): the codecs, error feedback, the silo and the coordinator
sides, and whole runs."""

import io

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedgen import config as C
from fedgen.algorithms.feddm.compression import INT8_LEVELS, compress, decode, decoded_replies, encode, reconstruct
from fedgen.core.records import Failure, Reply
from fedgen.federation.rundir import RunDir
from fedgen.privacy.client_dp import update_norm
from fedgen.runtimes.local import train

QUIET = Console(file=io.StringIO())


def _state(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(8, 3, 3, 3, generator=g) * scale,
            "conv.bias": torch.randn(8, generator=g) * scale, "norm.weight": torch.zeros(8)}


def test_fp16_sends_the_update_in_half_precision_exactly():
    update = _state(0, 1e-3)
    arrays = encode(update, "fp16")
    assert {v.dtype for v in arrays["update_fp16"].values()} == {torch.float16}
    for k, v in decode(arrays).items():
        assert torch.equal(v, update[k].half().float()), k


def test_int8_is_within_half_a_step_of_each_entry():
    update = _state(1, 0.05)
    arrays = encode(update, "int8")
    assert {v.dtype for v in arrays["update_int8"].values()} == {torch.int8}
    decoded = decode(arrays)
    for k, v in update.items():
        step = float(v.abs().max()) / INT8_LEVELS
        assert float(arrays["update_scale"][k]) == pytest.approx(step, rel=1e-6)
        assert float((decoded[k] - v).abs().max()) <= step / 2 * (1 + 1e-5), k
        if step > 0:  # the largest entry is exact up to float rounding: the grid reaches it
            assert int(arrays["update_int8"][k].abs().max()) == INT8_LEVELS
    assert torch.equal(decoded["norm.weight"], torch.zeros(8))  # an all-zero tensor: scale 0, no division by it


def test_error_feedback_adds_up_to_the_true_updates_on_a_toy():
    """Over T rounds the coordinator's decoded updates sum to the silo's true updates minus the last residual,
    which stays within half a quantisation step: nothing is lost for good. Without the feedback, entries below
    half a step are never sent: their sum is lost entirely."""
    global_state, rounds = _state(2), 100
    small = torch.tensor([1e-2] + [1e-5] * 7)  # one large entry sets the step (7.9e-5); the rest are under half
    residual = None
    sent = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
    plain = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
    true = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
    for t in range(rounds):
        update = _state(100 + t, 1e-3) | {"conv.bias": small}
        local = {k: global_state[k] + update[k] for k in update}
        arrays, residual = compress(local, global_state, "int8", residual, error_feedback=True)
        no_feedback, none = compress(local, global_state, "int8", None, error_feedback=False)
        assert none is None
        for k, v in decode(arrays).items():
            sent[k] += v.double()
            plain[k] += decode(no_feedback)[k].double()
            true[k] += (local[k] - global_state[k]).double()
    for k in true:
        step = float(decode(arrays)[k].abs().max()) / INT8_LEVELS
        assert float((true[k] - sent[k] - residual[k].double()).abs().max()) < 1e-5, k  # float32 rounding only
        assert float(residual[k].abs().max()) <= step / 2 * (1 + 1e-4) + 1e-7, k
    assert torch.equal(plain["conv.bias"][1:], torch.zeros(7, dtype=torch.float64))  # never sent
    assert float(true["conv.bias"][1:].min()) > 0.9 * rounds * 1e-5
    assert float((true["conv.bias"] - sent["conv.bias"]).abs().max()) < 1e-2 / INT8_LEVELS


def test_reconstruct_adds_the_update_to_the_global_weights_and_refuses_other_shapes():
    global_state = _state(3)
    local = {k: v + 1e-3 for k, v in global_state.items()}
    arrays, _ = compress(local, global_state, "fp16", None, error_feedback=False)
    back = reconstruct(arrays, global_state)
    for k in local:
        assert torch.allclose(back[k], local[k], atol=1e-6), k
    arrays["update_fp16"]["conv.bias"] = torch.zeros(1, dtype=torch.float16)  # would broadcast silently
    with pytest.raises(ValueError, match=r"conv.bias: shape \(1,\), the global model's \(8,\)"):
        reconstruct(arrays, global_state)


def _smoke(out, *overrides, rounds=3):
    cfg = C.load("tiny", overrides=["fl.clients=3", "fl.clients_per_round=2", f"fl.rounds={rounds}",
                                    "train.cpu_threads=1", "log.loss_eval_samples=16", *overrides])
    train(cfg, out, QUIET)
    return RunDir(out).round_records()


def test_an_int8_run_sends_a_quarter_of_the_bytes_and_keeps_each_silos_residual(tmp_path):
    plain = _smoke(tmp_path / "none")
    int8 = _smoke(tmp_path / "int8", "fl.compression=int8")
    fp16 = _smoke(tmp_path / "fp16", "fl.compression=fp16")
    state = load_file(tmp_path / "none" / "checkpoints" / "round_0003" / "global.safetensors")
    params = sum(v.numel() for v in state.values())
    for rec_plain, rec_int8, rec_fp16 in zip(plain, int8, fp16, strict=True):
        k = len(rec_plain["clients"])
        assert rec_plain["bytes_up"] == k * 4 * params
        assert rec_fp16["bytes_up"] == k * 2 * params
        assert rec_int8["bytes_up"] == k * (params + 4 * len(state))  # one byte an entry, a float32 scale a tensor
        assert rec_int8["bytes_down"] == rec_plain["bytes_down"]  # the broadcast is not compressed
        assert rec_int8["compression"] == "int8" and "compression" not in rec_plain
    # the residual a silo keeps is what it has not sent yet, at most half a step of its last update per entry
    residual = torch.load(sorted((tmp_path / "int8" / "silos").rglob("round_*.pt"))[-1], weights_only=False)
    assert residual["residual"].keys() == {k for k, v in state.items() if v.is_floating_point()}
    assert 0 < max(float(v.abs().max()) for v in residual["residual"].values()) < 1e-3
    # quantised training stays close to the lossless run over 3 rounds; it is not the same run
    losses = [(a["global_test_loss"], b["global_test_loss"]) for a, b in zip(plain, int8, strict=True)]
    assert all(abs(a - b) < 0.02 for a, b in losses) and losses[-1][0] != losses[-1][1]


def test_compression_resumes_bit_identically(tmp_path):
    """The residuals live in the silos' stores, versioned by round: 2 rounds + 1 more equals 3 straight."""
    _smoke(tmp_path / "straight", "fl.compression=int8", rounds=3)
    _smoke(tmp_path / "resumed", "fl.compression=int8", rounds=2)
    _smoke(tmp_path / "resumed", "fl.compression=int8", rounds=3)
    for name, a in load_file(tmp_path / "straight" / "checkpoints" / "round_0003" / "global.safetensors").items():
        b = load_file(tmp_path / "resumed" / "checkpoints" / "round_0003" / "global.safetensors")[name]
        assert torch.equal(a, b), name


def test_client_dp_sends_without_feedback_and_the_coordinator_clips_the_decoded_update(tmp_path):
    """Under client-level DP the silo sends its clipped update without error feedback (a residual would carry an
    unclipped remainder into the next round); the coordinator clips what it decoded to C again, so the noise's
    sensitivity holds for the rounded update it averages."""
    records = _smoke(tmp_path / "cdp", "fl.compression=int8", "privacy.mode=client-dp", "privacy.noise_multiplier=0.5",
                     "privacy.max_grad_norm=0.01", "privacy.delta=1e-3", "fl.clients_per_round=3", rounds=2)
    assert [r["compression"] for r in records] == ["int8", "int8"]
    assert not list((tmp_path / "cdp" / "silos").rglob("round_*.pt"))  # nothing kept between rounds

    global_state = _state(4)
    bias = torch.tensor([1.0] + [0.6 / INT8_LEVELS] * 7)  # 0.6 of a step rounds up to one step
    update = {k: torch.zeros_like(v) for k, v in global_state.items()} | {"conv.bias": bias * (0.01 / bias.norm())}
    local = {k: global_state[k].double() + update[k].double() for k in update}  # exactly at C = 0.01
    arrays, _ = compress(local, global_state, "int8", None, error_feedback=False)
    assert update_norm(reconstruct(arrays, global_state), global_state) > 0.01  # rounding pushed it over
    clipped = decoded_replies({0: Reply(0, arrays, {"num_examples": 1})}, global_state, clip_to=0.01)
    # clipped in float64, stored in float32: the norm is C up to float32 rounding of the weights
    assert update_norm(clipped[0].arrays["local"], global_state) == pytest.approx(0.01, rel=1e-5)
    unclipped = decoded_replies({0: Reply(0, arrays, {"num_examples": 1})}, global_state, clip_to=None)
    assert unclipped[0].arrays["local"].keys() == global_state.keys()


def test_an_update_that_cannot_be_decoded_is_a_failed_silo():
    global_state = _state(6)
    arrays, _ = compress({k: v + 1 for k, v in global_state.items()}, global_state, "int8", None, False)
    del arrays["update_scale"]["conv.bias"]
    out = decoded_replies({2: Reply(2, arrays, {"num_examples": 5}), 3: Failure(3, "timed out")}, global_state, None)
    assert isinstance(out[2], Failure) and "compressed update cannot be decoded" in out[2].reason
    assert out[3].reason == "timed out"


@pytest.mark.parametrize("overrides, message", [
    (["fl.compression=int8"], "fl.compression: used only by algorithm=feddm"),
])
def test_compression_is_refused_where_nothing_is_compressed(overrides, message):
    with pytest.raises(ValueError, match=message):
        C.load("pga-smoke", overrides=overrides)
    with pytest.raises(ValueError, match="fl.compression=fp16 with fl.centralized: the centralized baseline"):
        C.load("tiny", overrides=["fl.compression=fp16", "fl.centralized=true"])
