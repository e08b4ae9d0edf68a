"""Training throughput (images/s) of the U-Net presets on this machine.

Times full Adam steps on the DDPM loss (forward, backward, update) with random images of each preset's
input shape, after warm-up, and reports the median over repeats. Prints a table, writes JSON.

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
from fedgen.diffusion.loss import diffusion_loss
from fedgen.diffusion.schedule import ddpm_scheduler
from fedgen.fl.experiment import resolve_device
from fedgen.models.unet import build_unet

CASES = [
    # (arch, image shape, batch, bf16)
    ("cpu-small", (1, 28, 28), 64, False),
    ("cpu-small", (1, 28, 28), 64, True),
    ("paper", (1, 32, 32), 64, False),
    ("paper", (1, 32, 32), 64, True),
    ("paper", (3, 32, 32), 64, False),
]


def bench_case(arch, shape, batch, bf16, device, repeats, steps_per_repeat):
    torch.manual_seed(0)
    model = build_unet(ModelConfig(arch=arch), shape, 10).to(device)
    sched = ddpm_scheduler(DiffusionConfig(timesteps=300))
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    gen = torch.Generator().manual_seed(0)

    def step():
        loss = diffusion_loss(model, sched, x, y, gen, autocast_bf16=bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

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
    return {"arch": arch, "shape": list(shape), "batch": batch, "bf16": bf16,
            "params": sum(p.numel() for p in model.parameters()),
            "median_img_per_s": statistics.median(rates), "min_img_per_s": min(rates),
            "max_img_per_s": max(rates), "repeats": repeats, "steps_per_repeat": steps_per_repeat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timed repeat")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    rows = [bench_case(*case, device, args.repeats, args.steps) for case in CASES]
    print(f"training throughput on {device_name(device)} (torch {torch.__version__})")
    head = ("arch", "input", "batch", "bf16", "params", "median img/s", "min", "max")
    print("{:<10} {:<9} {:>5} {:>5} {:>8} {:>13} {:>7} {:>7}".format(*head))
    for r in rows:
        print(f"{r['arch']:<10} {'x'.join(map(str, r['shape'])):<9} {r['batch']:>5} {str(r['bf16']):>5} "
              f"{r['params'] / 1e6:>7.2f}M {r['median_img_per_s']:>13.1f} {r['min_img_per_s']:>7.1f} "
              f"{r['max_img_per_s']:>7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
