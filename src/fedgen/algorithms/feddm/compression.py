"""Compressed transport of a silo's update (`fl.compression`): what a silo sends instead of its full local weights.

- `none` (the default): the local weights themselves, float32; lossless, the paper's protocol.
- `fp16`: the update Delta = theta_local - theta_global in half precision (2 bytes a parameter);
- `int8`: Delta quantised per tensor, q = round(Delta / s) in [-127, 127] with s = max|Delta| / 127 (1 byte a
  parameter, plus one float32 scale a tensor); every entry is within s / 2 of the true value.

For the two lossy settings the silo keeps what it did not send (error feedback, Seide et al. 2014; Karimireddy et
al. 2019): it compresses Delta + e and keeps e <- (Delta + e) - decoded, in its state store, so the sum of what the
coordinator decodes over a silo's rounds equals the sum of its true updates up to the last residual. Compression
runs after everything that makes the update private (DP-SGD's noise is in Delta already; client-level DP's
clipping comes first), so it is post-processing of what DP analyses. Under client-level DP the residual would carry
unclipped remainders from one round into the next, so error feedback is off there, and the coordinator clips each
decoded update back to C before its noise (rounding can move it by up to s/2 per entry).

Integer tensors (none in fedgen's U-Nets today) travel as their local values, uncompressed.
"""

from __future__ import annotations

import torch

from fedgen.core.records import Failure, Reply, State
from fedgen.privacy.client_dp import clip_update

LOSSY = ("fp16", "int8")
INT8_LEVELS = 127  # symmetric: -127..127, so that 0 is exact and the grid has no bias


def _floating(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def delta(local: State, global_state: State) -> State:
    """theta_local - theta_global in float32, for the floating-point tensors."""
    return {k: local[k].float() - global_state[k].float() for k in _floating(global_state)}


def encode(update: State, kind: str) -> dict[str, State]:
    """The arrays a reply carries for `update` (a float32 Delta per floating tensor) under compression `kind`."""
    if kind == "fp16":
        return {"update_fp16": {k: v.half() for k, v in update.items()}}
    if kind == "int8":
        scales = {k: v.abs().max().reshape(1) / INT8_LEVELS for k, v in update.items()}
        quantised = {k: (v / scales[k]).round().clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
                     if float(scales[k]) > 0 else torch.zeros_like(v, dtype=torch.int8) for k, v in update.items()}
        return {"update_int8": quantised, "update_scale": scales}
    raise ValueError(f"unknown compression {kind!r}; expected one of none, {', '.join(LOSSY)}")


def decode(arrays: dict[str, State]) -> State:
    """The float32 Delta an encoded reply stands for."""
    if "update_fp16" in arrays:
        return {k: v.float() for k, v in arrays["update_fp16"].items()}
    if "update_int8" in arrays:
        scales = arrays["update_scale"]
        return {k: q.float() * scales[k].float() for k, q in arrays["update_int8"].items()}
    raise ValueError("reply holds no encoded update")


def is_encoded(arrays: dict[str, State]) -> bool:
    return "update_fp16" in arrays or "update_int8" in arrays


def compress(local: State, global_state: State, kind: str, residual: State | None,
             error_feedback: bool) -> tuple[dict[str, State], State | None]:
    """(the reply's arrays, the silo's residual to keep) for its local weights under compression `kind`. The
    integer tensors ride along as `local_exact`."""
    update = delta(local, global_state)
    if error_feedback and residual is not None:
        update = {k: v + residual[k] for k, v in update.items()}
    arrays = encode(update, kind)
    exact = {k: v for k, v in local.items() if not v.is_floating_point()}
    if exact:
        arrays["local_exact"] = exact
    if not error_feedback:
        return arrays, None
    sent = decode(arrays)
    return arrays, {k: update[k] - sent[k] for k in update}


def reconstruct(arrays: dict[str, State], global_state: State) -> State:
    """The local weights the coordinator averages: theta_global + decoded Delta, in each tensor's dtype. A key
    missing from the reply stays missing (the update screen rejects it); a wrong shape raises ValueError."""
    update = decode(arrays)
    exact = arrays.get("local_exact", {})
    out: State = {}
    for k, g in global_state.items():
        if k in update:
            if update[k].shape != g.shape:
                raise ValueError(f"{k}: shape {tuple(update[k].shape)}, the global model's {tuple(g.shape)}")
            out[k] = (g.float() + update[k]).to(g.dtype)
        elif k in exact:
            out[k] = exact[k]
    return out


def decoded_replies(replies: dict[int, Reply | Failure], global_state: State,
                    clip_to: float | None) -> dict[int, Reply | Failure]:
    """The coordinator's side: each reply with an encoded update turned into one with `local` weights (theta_global +
    the decoded update), which the update screen and FedAvg take as they are; one that cannot be decoded becomes a
    failed silo. `clip_to` (client-level DP's C): each decoded update is clipped to it again, because the noise's
    sensitivity must hold for what is averaged and rounding can move an update by half a step per entry."""
    out: dict[int, Reply | Failure] = {}
    for silo, reply in replies.items():
        if isinstance(reply, Reply) and is_encoded(reply.arrays):
            try:
                local = reconstruct(reply.arrays, global_state)
            except (ValueError, KeyError) as exc:
                out[silo] = Failure(silo, f"compressed update cannot be decoded: {exc}")
                continue
            if clip_to is not None:
                local, _ = clip_update(local, global_state, clip_to)
            kept = {k: v for k, v in reply.arrays.items() if k == "control_delta"}
            reply = Reply(silo, kept | {"local": local}, reply.config)
        out[silo] = reply
    return out
