"""PGA's coordinating side (docs/DESIGN.md, PGA): the global generator, trained from what the parties send back.

Per generator step: draw fake batches 1 and 2 from the current generator; send both (images and labels, never
weights) to every party in one message; each party answers with d_i, g_i, the noised g_i and, where asked,
dg_i/d(fake batch 2). A representative party r is drawn uniformly per step (seeded). The generator's update is
the backward pass of fake batch 2 with the gradient `pga.aggregation` chooses:

- `ratio` (default, the faithful reading of the paper's ambiguous step 3): rho * dL_r/dfake, with
  rho = clamp(mean of the noised losses / L_r, 0, rho_max): direction from the representative, magnitude from
  the noised average;
- `mean`: the mean of every live party's dg_i/dfake (MD-GAN style);
- `literal`: dL_r/dfake alone; the noised average is only logged.

Adding noise to a scalar loss does not hide what a discriminator learnt: none of this is differential privacy.
Formal privacy comes from `privacy.mode=dp-sgd`: each party trains its discriminator with DP-SGD
(algorithms/pga/silo.py); everything the generator receives is then post-processing of DP discriminators.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from fedgen.core.progress import task
from fedgen.core.records import Reply, Request, State, payload_nbytes
from fedgen.core.seeding import generator
from fedgen.federation.algorithm import RoundContext, TrainingAborted
from fedgen.federation.rundir import Checkpoint
from fedgen.nn.gan import GANSampler, new_generator
from fedgen.privacy.ledger import RunPrivacy

BETAS = (0.5, 0.999)


def generator_average(g: torch.nn.Module, decay: float) -> AveragedModel:
    """torch's AveragedModel over the generator's parameters and buffers (BatchNorm's running statistics, which
    sampling in eval mode reads), with the warm-up decay min(decay, (1 + n) / (10 + n)) of FedDM's EMA: the first
    steps' generators, far from trained, are forgotten quickly. The first update copies the generator."""

    def average(avg: torch.Tensor, new: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        return d * avg + (1 - d) * new

    return AveragedModel(g, avg_fn=average, use_buffers=True)


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """MSGAN's term (Mao et al. 2019): 1 / (mean |G(z_a) - G(z_b)| / mean |z_a - z_b| + 1e-5) over the pairs
    (i, i + n/2) of a batch whose pairs share a label. Minimising it pushes images of one class apart as their z
    differ, against the mode collapse that conditional GANs show within a class."""
    half = len(fake) // 2
    a, b = slice(0, half), slice(len(fake) - half, len(fake))
    ratio = (fake[a] - fake[b]).abs().mean() / (z[a] - z[b]).abs().mean()
    return 1 / (ratio + 1e-5)


class PGA:
    """PGA's coordinator: `pga.steps_per_round` generator steps per round, each one message to every party."""

    def __init__(self, ctx: RoundContext):
        cfg, fed = ctx.cfg, ctx.fed
        self.ctx, self.cfg = ctx, cfg
        self.g = new_generator(cfg, fed.image_shape, fed.num_classes, ctx.device)
        self.opt = torch.optim.Adam(self.g.parameters(), lr=cfg.pga.lr_generator, betas=BETAS)
        self.ema = generator_average(self.g, cfg.pga.ema_decay) if cfg.pga.ema_decay > 0 else None
        self.parties = [s.silo for s in fed.silos]
        self.privacy = RunPrivacy(cfg, None, sum(p.numel() for p in self.g.parameters()))  # no client-dp in PGA

    @property
    def network(self) -> torch.nn.Module:
        return self.g

    @property
    def weights(self) -> str:
        """"ema" where the run keeps an average of the generator (pga.ema_decay), else "raw"."""
        return "raw" if self.ema is None else "ema"

    def checkpoint(self, rounds_done: int, meta: dict) -> Checkpoint:
        state: State = {k: v.detach().clone() for k, v in self.g.state_dict().items()}
        ema = None
        if self.ema is not None:
            ema = ({k: v.detach().clone() for k, v in self.ema.module.state_dict().items()},
                   int(self.ema.n_averaged))
        return Checkpoint(rounds_done, state, self.opt.state_dict(), meta, ema)

    def restore(self, ckpt: Checkpoint) -> None:
        self.g.load_state_dict(ckpt.global_state)
        if ckpt.optimizer_state is not None:
            self.opt.load_state_dict(ckpt.optimizer_state)
        if self.ema is not None and ckpt.ema is not None:
            state, updates = ckpt.ema
            self.ema.module.load_state_dict(state)
            self.ema.n_averaged.fill_(updates)

    def _non_finite(self, r: int, s: int, what: str) -> TrainingAborted:
        return TrainingAborted(f"round {r + 1} aborted at generator step {s + 1}: {what}. Nothing was written for "
                               f"this round; the last good checkpoint is {self.ctx.last_checkpoint()}; lower "
                               "pga.lr_generator / pga.lr_discriminator or check the data.")

    def sampler(self) -> GANSampler:
        return GANSampler(self.g if self.ema is None else self.ema.module)

    def summary(self, record: dict) -> str:
        g, rho = record["g_representative_mean"], record["rho_mean"]
        return (f"generator loss (representative) {g if g is None else round(g, 4)}, discriminator loss on fakes "
                f"{np.mean(list(record['d_mean'].values())):.4f}, rho {rho if rho is None else round(rho, 3)}, "
                f"{len(record['d_mean'])}/{len(record['clients'])} parties")

    def round(self, r: int) -> tuple[dict, dict]:
        ctx, cfg = self.ctx, self.cfg
        t0 = time.perf_counter()
        d_sum, g_sum, live_steps = Counter(), Counter(), Counter()
        representatives, rejected, rhos, g_reps, noised_means = Counter(), {}, [], [], []
        bytes_down = bytes_up = 0
        skipped: list[dict] = []  # generator steps without an update, and why
        steps = cfg.pga.steps_per_round
        with task(ctx.progress, f"round {r + 1}: generator steps", steps) as advance:
            for s in range(steps):
                out = self._step(r, s)
                for silo, reply in sorted(out["live"].items()):
                    self.privacy.observe(silo, reply.config, r)
                    d_sum[silo] += reply.config["d"]
                    g_sum[silo] += reply.config["g"]
                    live_steps[silo] += 1
                for silo, reason in out["rejected"].items():
                    rejected.setdefault(str(silo), reason)
                representatives[out["representative"]] += 1
                if out["skipped"]:
                    skipped.append({"step": s + 1, "why": out["skipped"]})
                    ctx.console.print(f"[yellow]round {r + 1}, generator step {s + 1} skipped:[/] {out['skipped']}",
                                      highlight=False)
                else:
                    rhos.append(out["rho"])
                    g_reps.append(out["g_representative"])
                noised_means.append(out["noised_mean"])
                bytes_down += out["bytes_down"]
                bytes_up += out["bytes_up"]
                if advance is not None:
                    advance()
        record = {
            "event": "round", "round": r + 1, "clients": self.parties, "algorithm": "pga",
            "aggregation": cfg.pga.aggregation, "steps": steps,
            "d_mean": {str(k): d_sum[k] / live_steps[k] for k in sorted(live_steps)},
            "g_mean": {str(k): g_sum[k] / live_steps[k] for k in sorted(live_steps)},
            "g_representative_mean": float(np.mean(g_reps)) if g_reps else None,
            "noised_loss_mean": float(np.mean(noised_means)),
            "rho_mean": float(np.mean(rhos)) if rhos else None, "rho_min": float(np.min(rhos)) if rhos else None,
            "rho_max": float(np.max(rhos)) if rhos else None, "skipped_steps": len(skipped), "skipped": skipped,
            "noise_sd_mean": {str(k): cfg.pga.noise_ratio * d_sum[k] / live_steps[k] for k in sorted(live_steps)},
            "representatives": {str(k): v for k, v in sorted(representatives.items())},
            "rejected": rejected,
            "train_time_s": round(time.perf_counter() - t0, 3),
            "step_time_s": round((time.perf_counter() - t0) / steps, 4), "bytes_down": bytes_down,
            "bytes_up": bytes_up,
        }
        return record, {}

    def _step(self, r: int, s: int) -> dict:
        ctx, cfg = self.ctx, self.cfg
        gen = generator(cfg.train.seed, "pga-generator", r, s)
        b, k, device = cfg.train.batch_size, ctx.fed.num_classes, ctx.device
        z1, z2 = torch.randn(b, cfg.pga.z_dim, generator=gen), torch.randn(b, cfg.pga.z_dim, generator=gen)
        y1, y2 = torch.randint(k, (b,), generator=gen), torch.randint(k, (b,), generator=gen)
        if cfg.pga.mode_seeking > 0:  # pairs (i, i + b/2) of fake batch 2 share a label
            y2[b - b // 2:] = y2[:b // 2]
        representative = self.parties[int(torch.randint(len(self.parties), (), generator=gen))]
        self.g.train()
        with torch.no_grad():
            fake1 = self.g(z1.to(device), y1.to(device))
        fake2 = self.g(z2.to(device), y2.to(device))
        batch = {"fake1": fake1.cpu(), "labels1": y1, "fake2": fake2.detach().cpu(), "labels2": y2}
        everyone_grads = cfg.pga.aggregation == "mean"
        requests = [Request(p, "pga-step", {"batch": batch},
                            {"round": r, "step": s, "want_grad": everyone_grads or p == representative,
                             "privacy_steps": self.privacy.known_steps(p)})
                    for p in self.parties]
        if not torch.isfinite(fake2).all():
            raise self._non_finite(r, s, "the generator's output is NaN/Inf")
        replies = ctx.fed.pool.send(requests, timeout=cfg.runtime.round_timeout_s)
        ctx.stop_on_fatal(r, replies)
        live = {p: rep for p, rep in replies.items() if isinstance(rep, Reply) and "error" not in rep.config}
        rejected = {p: (rep.reason if not isinstance(rep, Reply) else rep.config["error"])
                    for p, rep in replies.items() if p not in live}
        for p, rep in live.items():
            bad = [key for key in ("d", "g", "g_noised") if not np.isfinite(rep.config[key])]
            if bad or ("grad" in rep.arrays and not torch.isfinite(rep.arrays["grad"]["fake2"]).all()):
                raise self._non_finite(r, s, f"party {p}'s discriminator loss is NaN/Inf ({', '.join(bad) or 'grad'})")
        if len(live) < cfg.fl.min_clients:
            raise ctx.abort(r, len(live), len(self.parties), rejected)
        with_grad = [p for p in self.parties if p in live and "grad" in live[p].arrays]
        noised_mean = float(np.mean([rep.config["g_noised"] for rep in live.values()]))
        result = {"live": live, "rejected": rejected, "representative": representative,
                  "noised_mean": noised_mean, "bytes_down": sum(payload_nbytes(q.arrays) for q in requests),
                  "bytes_up": sum(payload_nbytes(rep.arrays) for rep in live.values())}
        if not with_grad:  # no party that was asked for a gradient answered: no update this step
            why = f"party {representative} (the representative) did not answer: {rejected.get(representative, '?')}" \
                if cfg.pga.aggregation != "mean" else "no party returned a gradient"
            return result | {"rho": float("nan"), "g_representative": float("nan"), "skipped": why}
        if cfg.pga.aggregation == "mean":  # the mean of the live parties' gradients; the representative may be gone
            grad = torch.stack([live[p].arrays["grad"]["fake2"] for p in with_grad]).mean(0)
            g_rep = float(np.mean([live[p].config["g"] for p in with_grad]))
            rho = 1.0
        else:
            g_rep = float(live[representative].config["g"])
            grad = live[representative].arrays["grad"]["fake2"]
            rho = min(max(noised_mean / g_rep, 0.0), cfg.pga.rho_max) if cfg.pga.aggregation == "ratio" else 1.0
        self.opt.zero_grad(set_to_none=True)
        # the parties' gradient enters as d(fake2 . rho grad)/dθ = (d fake2/dθ)^T rho grad
        objective = (fake2 * (rho * grad).to(device)).sum()
        if cfg.pga.mode_seeking > 0:
            objective = objective + cfg.pga.mode_seeking * mode_seeking_loss(fake2, z2.to(device))
        objective.backward()
        self.opt.step()
        if self.ema is not None:
            self.ema.update_parameters(self.g)
        return result | {"rho": rho, "g_representative": g_rep, "skipped": None}
