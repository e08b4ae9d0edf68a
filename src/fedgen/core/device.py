"""The torch device a run asks for."""

from __future__ import annotations

import torch

from fedgen.core.errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"train.device={name!r} but no CUDA device is available")
    return device


def cpu_bf16_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's native bfloat16 instructions (avx512_bf16, amx_bf16) from /proc/cpuinfo; None where it cannot be
    told (not Linux)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    return None if flags is None else {f for f in flags if f in ("avx512_bf16", "amx_bf16")}


def emulated_bf16_note(device: torch.device, settings: list[str], cpuinfo: str | None = None) -> str | None:
    """A one-line note when bfloat16 autocast is asked for (`settings`, e.g. ["train.bf16"]) on a CPU without native
    bf16: torch emulates it, several times slower (measured on an AVX2-only EPYC: a default-job round 248 s with
    train.bf16, 29 s without). The config is left as it is, so results stay those of the config the run records."""
    if device.type != "cpu" or not settings or cpu_bf16_flags(cpuinfo) != set():
        return None
    verb = "runs" if len(settings) == 1 else "run"
    return (f"this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag): {' and '.join(settings)} {verb} "
            "emulated, several times slower; for speed here: " + " ".join(f"--set {s}=false" for s in settings))
