"""DP-MERF's coordinating side (Harder et al., AISTATS 2021; docs/DESIGN.md, DP-MERF), federated.

Round 1 first asks every silo for its class-conditional feature sum (algorithms/merf/silo.py), noised by the silo
itself where `privacy.mode = "dp-release"`, and adds them up: the sum over silos is the federation's sum, so the
Dirichlet split changes nothing but the noise (N silos' noise adds up). The class proportions are read from the
same noised sums. From then on the generator trains here alone, `merf.steps_per_round` steps per round, to match
its batch's mean embedding to the data's: post-processing of the releases, no further privacy cost, no messages.

The summed release is kept with the optimizer's state in every checkpoint, so a resumed run never asks again.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedgen.algorithms.merf.embedding import FourierFeatures, mmd_loss, target_embedding
from fedgen.core.progress import task
from fedgen.core.records import Reply, Request, State, payload_nbytes
from fedgen.core.seeding import generator
from fedgen.federation.algorithm import RoundContext, TrainingAborted
from fedgen.federation.rundir import Checkpoint
from fedgen.nn.gan import GANSampler, new_generator
from fedgen.privacy.ledger import RunPrivacy


class MERF:
    """The coordinator of a DP-MERF run: one release per silo, then generator steps against their sum."""

    weights = "raw"

    def __init__(self, ctx: RoundContext):
        cfg, fed = ctx.cfg, ctx.fed
        self.ctx, self.cfg = ctx, cfg
        self.g = new_generator(cfg, fed.image_shape, fed.num_classes, ctx.device)
        self.opt = torch.optim.Adam(self.g.parameters(), lr=cfg.merf.lr)
        self.features = FourierFeatures(fed.image_shape, cfg.merf.features, cfg.merf.bandwidths, cfg.train.seed,
                                        ctx.device)
        self.parties = [s.silo for s in fed.silos]
        self.sums: torch.Tensor | None = None  # the silos' summed release
        self.privacy = RunPrivacy(cfg, None, sum(p.numel() for p in self.g.parameters()))

    @property
    def network(self) -> torch.nn.Module:
        return self.g

    def checkpoint(self, rounds_done: int, meta: dict) -> Checkpoint:
        state: State = {k: v.detach().clone() for k, v in self.g.state_dict().items()}
        return Checkpoint(rounds_done, state, {"adam": self.opt.state_dict(), "release": self.sums}, meta)

    def restore(self, ckpt: Checkpoint) -> None:
        self.g.load_state_dict(ckpt.global_state)
        self.opt.load_state_dict(ckpt.optimizer_state["adam"])
        self.sums = ckpt.optimizer_state["release"].cpu()

    def sampler(self) -> GANSampler:
        return GANSampler(self.g)

    def summary(self, record: dict) -> str:
        return f"MMD^2 {record['loss_mean']:.5f} (last step {record['loss_last']:.5f}), {record['steps']} steps"

    def _collect(self, r: int) -> int:
        """Every silo's release, summed; a silo that does not answer aborts the round (its records would be
        missing from the target). Returns the bytes received."""
        ctx = self.ctx
        requests = [Request(p, "merf-release", {}, {"privacy_steps": self.privacy.known_steps(p)})
                    for p in self.parties]
        replies = ctx.fed.pool.send(requests, timeout=self.cfg.runtime.round_timeout_s)
        ctx.stop_on_fatal(r, replies)
        rejected = {p: (rep.reason if not isinstance(rep, Reply) else rep.config["error"])
                    for p, rep in replies.items() if not isinstance(rep, Reply) or "error" in rep.config}
        if rejected:
            raise TrainingAborted(
                f"round {r + 1} aborted: DP-MERF needs every silo's release once; missing: "
                + "; ".join(f"silo {p}: {why}" for p, why in sorted(rejected.items()))
                + ". Nothing was written; rerun the same command once they are back.")
        for p, rep in sorted(replies.items()):
            self.privacy.observe(p, rep.config, r)
        self.sums = torch.stack([replies[p].arrays["release"]["sums"].double() for p in self.parties]).sum(0)
        return sum(payload_nbytes(rep.arrays) for rep in replies.values())

    def round(self, r: int) -> tuple[dict, dict]:
        cfg, device = self.cfg, self.ctx.device
        t0 = time.perf_counter()
        bytes_up = self._collect(r) if self.sums is None else 0
        target, proportions = target_embedding(self.sums)
        target = target.to(device)
        losses = []
        self.g.train()
        with task(self.ctx.progress, f"round {r + 1}: generator steps", cfg.merf.steps_per_round) as advance:
            for s in range(cfg.merf.steps_per_round):
                gen = generator(cfg.train.seed, "merf-generator", r, s)
                labels = torch.multinomial(proportions, cfg.train.batch_size, replacement=True, generator=gen)
                z = torch.randn(cfg.train.batch_size, cfg.merf.z_dim, generator=gen)
                loss = mmd_loss(self.features, target, self.g(z.to(device), labels.to(device)), labels.to(device))
                if not torch.isfinite(loss):
                    raise TrainingAborted(f"round {r + 1} aborted at generator step {s + 1}: the loss is NaN/Inf; "
                                          f"the last good checkpoint is {self.ctx.last_checkpoint()}; lower merf.lr")
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                losses.append(float(loss.detach()))
                if advance is not None:
                    advance()
        elapsed = time.perf_counter() - t0
        record = {"event": "round", "round": r + 1, "clients": self.parties if bytes_up else [],
                  "algorithm": "merf", "steps": cfg.merf.steps_per_round, "loss_mean": float(np.mean(losses)),
                  "loss_last": losses[-1], "class_proportions": [round(float(p), 5) for p in proportions],
                  "train_time_s": round(elapsed, 3), "step_time_s": round(elapsed / cfg.merf.steps_per_round, 4),
                  "bytes_down": 0, "bytes_up": bytes_up}
        return record, {}
