"""Training throughput (images/s) of the U-Net presets on this machine, and what fraction of the machine's
matmul peak it reaches.

Times full Adam steps on the DDPM loss (forward, backward, update) with random images of each preset's
input shape, after warm-up, and reports the median over repeats; `dp` rows are the same steps under DP-SGD
(Opacus per-sample gradients, clipping, noise: fedgen.privacy.dpsgd). The peak is the median FLOP/s of a square
matmul in fp32 and in bf16; a step's FLOPs are counted once by torch's FlopCounterMode (forward and backward).
Prints a table, writes JSON.

    .venv/bin/python bench/train_throughput.py [--repeats 5] [--out bench/results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import device_name

from fedgen.config import DiffusionConfig, ModelConfig
from fedgen.core.device import resolve_device
from fedgen.diffusion.loss import diffusion_loss
from fedgen.diffusion.schedule import ddpm_scheduler
from fedgen.nn.unet import build_unet

CASES = [
    # (arch, image shape, batch, bf16, dp)
    ("cpu-small", (1, 28, 28), 64, False, False),
    ("cpu-small", (1, 28, 28), 64, True, False),
    ("cpu-small", (1, 28, 28), 64, False, True),
    ("cpu-small", (1, 28, 28), 64, True, True),
    ("paper", (1, 32, 32), 64, False, False),
    ("paper", (1, 32, 32), 64, True, False),
    ("paper", (3, 32, 32), 64, False, False),
]


def matmul_peak(device, dtype, n: int, repeats: int = 5) -> float:
    """Median FLOP/s of an n x n matmul (2 n^3 FLOPs) in `dtype`."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(3 * 2 * n**3 / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_case(arch, shape, batch, bf16, dp, device, repeats, steps_per_repeat):
    from torch.utils.flop_counter import FlopCounterMode

    from fedgen.privacy.dpsgd import PrivateSteps

    torch.manual_seed(0)
    model = build_unet(ModelConfig(arch=arch), shape, 10).to(device)
    sched = ddpm_scheduler(DiffusionConfig(timesteps=300))
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    gen = torch.Generator().manual_seed(0)
    trainer = PrivateSteps(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
                             noise_generator=torch.Generator(device=device).manual_seed(0)) if dp else None

    def step():
        per_image = diffusion_loss(model, sched, x, y, gen, autocast_bf16=bf16, reduction="none")
        if trainer is not None:
            trainer.step(per_image, batch)
            return
        opt.zero_grad(set_to_none=True)
        per_image.mean().backward()
        opt.step()

    flops = None
    if not dp:  # per-sample gradients are extra work; the model's useful FLOPs are the plain step's
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    for _ in range(2):
        step()
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps_per_repeat):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(batch * steps_per_repeat / (time.perf_counter() - t0))
    if trainer is not None:
        trainer.close()
    median = statistics.median(rates)
    return {"arch": arch, "shape": list(shape), "batch": batch, "bf16": bf16, "dp": dp,
            "params": sum(p.numel() for p in model.parameters()),
            "median_img_per_s": median, "min_img_per_s": min(rates),
            "max_img_per_s": max(rates), "repeats": repeats, "steps_per_repeat": steps_per_repeat,
            "flops_per_img": flops / batch if flops else None,
            "achieved_flop_per_s": flops / batch * median if flops else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timed repeat")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    n = 4096 if device.type == "cuda" else 2048
    peak = {"fp32": matmul_peak(device, torch.float32, n), "bf16": matmul_peak(device, torch.bfloat16, n)}
    rows = [bench_case(*case, device, args.repeats, args.steps) for case in CASES]
    plain = {(r["arch"], tuple(r["shape"]), r["bf16"]): r["median_img_per_s"] for r in rows if not r["dp"]}
    for r in rows:
        r["fraction_of_peak"] = r["achieved_flop_per_s"] / peak["bf16" if r["bf16"] else "fp32"] \
            if r["achieved_flop_per_s"] else None
        r["slowdown_vs_plain"] = plain[(r["arch"], tuple(r["shape"]), r["bf16"])] / r["median_img_per_s"]
    print(f"training throughput on {device_name(device)} (torch {torch.__version__})")
    print(f"matmul peak ({n}x{n}): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s")
    head = ("arch", "input", "batch", "bf16", "dp", "params", "median img/s", "min", "max", "GFLOP/s", "of peak",
            "vs plain")
    print("{:<10} {:<9} {:>5} {:>5} {:>5} {:>8} {:>13} {:>7} {:>7} {:>8} {:>8} {:>8}".format(*head))
    for r in rows:
        achieved = f"{r['achieved_flop_per_s'] / 1e9:.1f}" if r["achieved_flop_per_s"] else "—"
        frac = f"{100 * r['fraction_of_peak']:.1f}%" if r["fraction_of_peak"] else "—"
        print(f"{r['arch']:<10} {'x'.join(map(str, r['shape'])):<9} {r['batch']:>5} {str(r['bf16']):>5} "
              f"{str(r['dp']):>5} {r['params'] / 1e6:>7.2f}M {r['median_img_per_s']:>13.1f} "
              f"{r['min_img_per_s']:>7.1f} {r['max_img_per_s']:>7.1f} {achieved:>8} {frac:>8} "
              f"{r['slowdown_vs_plain']:>7.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "matmul_peak_flop_per_s": peak, "matmul_n": n}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
