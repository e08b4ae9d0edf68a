"""How DP-MERF's kernel was chosen: one candidate at a time, at epsilon = 10 with ten silos' worth of noise.

    .venv/bin/python bench/merf_kernel_ablation.py --scales 1.0 [--unbiased] [--out bench/results/merf_kernel.json]

A standalone prototype, written before `algorithm = "merf"` existed and kept because it produced the ablation in
docs/PERFORMANCE.md: all 60,000 Fashion-MNIST training images embedded centrally, then N(0, 10 sigma^2) added per
entry, the distribution of the sum of ten silos' releases, each at (10, 1e-5) (sigma from Opacus's PRV accountant,
one Gaussian mechanism, sensitivity 1); the generator (fedgen's ConditionalGenerator, width 64) trained 1,500 steps
at batch 256 with Adam (lr 1e-3) on |target - batch embedding|^2; TSTR: fedgen's EvalCNN recipe (4 epochs) on
20,000 generated images (2,000 per class), tested on the real test set. `--scales`: length scales as multiples of
23.0, the median distance between training images (several: frequencies split equally, their mean kernel);
`--unbiased`: the U-statistic for the batch's squared norm instead of the biased square. The runs of fedgen itself
are bench/dp_tstr.py's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from common import device_name

from fedgen.data.sources import load_dataset
from fedgen.data.transforms import to_tensor
from fedgen.evaluation.tstr import tstr_accuracy
from fedgen.nn.gan import ConditionalGenerator
from fedgen.privacy.accountant import solve_noise_multiplier

MEDIAN = 23.0  # median pairwise distance of Fashion-MNIST training images in [-1, 1] (2,000 of them)
K, SILOS = 10, 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1.0", help="length scales as multiples of the median distance")
    ap.add_argument("--features", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epsilon", type=float, default=10.0)
    ap.add_argument("--unbiased", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/results/merf_kernel.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d_features, scales = args.features, [float(v) for v in args.scales.split(",")]
    ds = load_dataset("fashion-mnist")
    x, y = to_tensor(ds.train.images).flatten(1), torch.from_numpy(ds.train.labels).long()
    w = torch.cat([torch.randn(x.shape[1], d_features // 2 // len(scales)) / (MEDIAN * c) for c in scales], 1)

    def phi(v: torch.Tensor) -> torch.Tensor:
        p = v @ w
        f = torch.cat([p.cos(), p.sin()], 1) / math.sqrt(d_features // 2)
        return torch.cat([f / math.sqrt(2), torch.full((len(v), 1), 1 / math.sqrt(2))], 1)

    sums = torch.zeros(K, d_features + 1)
    for i in range(0, len(x), 2000):
        sums.index_add_(0, y[i:i + 2000], phi(x[i:i + 2000]))
    sigma = solve_noise_multiplier("prv", args.epsilon, 1e-5, 1.0, 1)
    sums = sums + math.sqrt(SILOS) * sigma * torch.randn(K, d_features + 1)
    counts = (sums[:, -1] * math.sqrt(2)).clamp(min=1)
    target, probs = sums / counts.sum(), counts / counts.sum()
    g = ConditionalGenerator((1, 28, 28), K, 100, 64)
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    t0, b = time.perf_counter(), args.batch
    for _ in range(args.steps):
        labels = torch.multinomial(probs, b, replacement=True)
        m = torch.zeros(K, d_features + 1).index_add(0, labels, phi(g(torch.randn(b, 100), labels).flatten(1))) / b
        if args.unbiased:
            total = m * b
            loss = (target ** 2).sum() - 2 * (target * m).sum() + ((total ** 2).sum() - b) / (b * (b - 1))
        else:
            loss = ((target - m) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    g.eval()
    with torch.no_grad():
        labels = torch.arange(K).repeat_interleave(2000)
        images = torch.cat([g(torch.randn(1000, 100), labels[i:i + 1000]) for i in range(0, len(labels), 1000)])
    acc = tstr_accuracy(images, labels, to_tensor(ds.test.images), torch.from_numpy(ds.test.labels).long(), K,
                        epochs=4)
    row = {"scales_x_median": scales, "features": d_features, "steps": args.steps, "batch": b,
           "epsilon": args.epsilon, "delta": 1e-5, "silos": SILOS, "sigma_per_silo": sigma,
           "estimator": "unbiased" if args.unbiased else "biased", "tstr_accuracy": acc, "tstr_generated": 20000,
           "train_s": round(train_s, 1)}
    print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": {"device": device_name(torch.device("cpu")), "seeds": 1},
                                    "results": [row]}, indent=2))


if __name__ == "__main__":
    main()
