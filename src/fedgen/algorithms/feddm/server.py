"""FedDM's coordinating side (Algorithm 1 of the paper): per round, select K silos, send the global weights, screen
the updates, FedAvg (or client-level DP's noised mean), the server optimiser's step, SCAFFOLD's server variate,
the EMA, and the new global model's loss on the silos' data and the test split."""

from __future__ import annotations

import math
import time

import torch

from fedgen.algorithms.feddm.compression import decoded_replies
from fedgen.algorithms.feddm.ema import WeightAverage
from fedgen.algorithms.feddm.local_update import evaluation_loss
from fedgen.algorithms.feddm.remedies import scaffold_server_update
from fedgen.algorithms.feddm.screening import FedAvgServer
from fedgen.algorithms.feddm.server_opt import ServerOptimizer
from fedgen.core.records import Failure, Reply, Request, State, payload_nbytes
from fedgen.diffusion.pipeline import DiffusionSampler
from fedgen.diffusion.schedule import ddpm_scheduler
from fedgen.federation.algorithm import RoundContext
from fedgen.federation.rundir import Checkpoint
from fedgen.nn.unet import new_unet, null_label
from fedgen.privacy.accountant import epsilon
from fedgen.privacy.client_dp import noise_to_signal, noised_mean_update
from fedgen.privacy.ledger import RunPrivacy
from fedgen.privacy.secret import party_secret, secret_generator


class FedDM:
    """FedDM's server side (Algorithm 1): per round, select K silos, fit, screen, FedAvg, the silos' losses."""

    def __init__(self, ctx: RoundContext):
        cfg, fed = ctx.cfg, ctx.fed
        self.ctx = ctx
        self.model = new_unet(cfg, fed.image_shape, fed.num_classes, ctx.device)
        self.scheduler = ddpm_scheduler(cfg.diffusion)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        per_round = 1 if cfg.fl.centralized else cfg.fl.k
        # client-level DP bounds each update by clipping; screening by the others' norms would make one client's
        # acceptance depend on another's data, outside the mechanism the accountant analyses
        outlier_ratio = math.inf if cfg.privacy.mode == "client-dp" else cfg.fl.max_update_norm_ratio
        self.scaffold = cfg.fl.strategy == "scaffold"
        self.server = FedAvgServer(len(fed.silos), per_round, cfg.train.seed, state, outlier_ratio,
                                   expects_control=self.scaffold)
        self.server_optimizer = ServerOptimizer(cfg.fl, state)  # fedavg: SGD at lr 1, plain averaging
        # SCAFFOLD's server variate c = sum_i p_i c_i (algorithms/feddm/remedies.py); each silo's c_i stays with it
        self.control = {k: torch.zeros_like(v) for k, v in state.items() if v.is_floating_point()} \
            if self.scaffold else None
        self.averager = WeightAverage(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.privacy = RunPrivacy(cfg, ctx.run.path, sum(p.numel() for p in self.model.parameters()))
        if self.privacy.server is not None:
            _announce_client_dp(ctx, self.privacy)

    @property
    def network(self) -> torch.nn.Module:
        return self.model

    @property
    def weights(self) -> str:
        return "ema" if self.averager is not None else "raw"

    @property
    def state(self) -> State:
        return self.server.global_state

    def _server_state(self) -> dict | None:
        """The server's own state beyond the weights: its optimiser's (moments, float64 master weights) and
        SCAFFOLD's control variate; None for plain FedAvg (the centralized baseline's Adam lives with its silo)."""
        saved = {"server_optimizer": self.server_optimizer.state_dict(), "scaffold_control": self.control}
        return saved if any(v is not None for v in saved.values()) else None

    def checkpoint(self, rounds_done: int, meta: dict) -> Checkpoint:
        ema = self.averager.state() if self.averager is not None else None
        return Checkpoint(rounds_done, self.state, self._server_state(), meta, ema)

    def restore(self, ckpt: Checkpoint) -> None:
        saved = ckpt.optimizer_state or {}
        self.server.global_state = ckpt.global_state
        self.server_optimizer.load_state_dict(saved.get("server_optimizer"), ckpt.global_state)
        if self.scaffold and saved.get("scaffold_control") is not None:
            self.control = saved["scaffold_control"]
        if self.averager is not None:
            self.averager.restore(ckpt.ema)

    def sampler(self) -> DiffusionSampler:
        """The global model as a labelled sampler: its EMA weights where the run keeps them."""
        self.model.load_state_dict(self.averager.state()[0] if self.averager is not None else self.state)
        ev = self.ctx.cfg.eval  # training-time grids and evaluation use the evaluation sampler
        return DiffusionSampler(self.model, self.ctx.cfg.diffusion, self.ctx.fed.image_shape,
                                null_label(self.model, self.ctx.fed.num_classes), ev.sampler, ev.steps,
                                bf16=ev.bf16)

    def summary(self, record: dict) -> str:
        test = f"test loss {record['global_test_loss']:.4f}, " if record.get("global_test_loss") is not None else ""
        clients = record["global_client_loss"]
        mean = f"mean client loss {record['global_client_loss_mean']:.4f}, " if clients else ""
        return (f"{test}{mean}"
                f"{len(record['aggregated'])}/{len(record['clients'])} clients")

    def round(self, r: int) -> tuple[dict, dict[int, State]]:
        ctx, cfg, server = self.ctx, self.ctx.cfg, self.server
        t0 = time.perf_counter()
        selected = server.select(r)
        arrays = {"global": server.global_state} | ({"control": self.control} if self.scaffold else {})
        sent = [Request(silo, "fit", arrays, {"round": r, "privacy_steps": self.privacy.known_steps(silo)})
                for silo in selected]
        replies = ctx.fed.pool.send(sent, timeout=cfg.runtime.round_timeout_s, progress=ctx.progress)
        ctx.stop_on_fatal(r, replies)
        screened = server.screen(selected, self._decoded(replies))
        if len(screened.accepted) < cfg.fl.min_clients:
            raise ctx.abort(r, len(screened.accepted), len(selected), screened.rejected)
        for silo, reason in screened.rejected.items():
            ctx.console.print(f"[yellow]round {r + 1}: client {silo} left out:[/] {reason}", highlight=False)
        for silo, reply in sorted(replies.items()):  # a rejected update still spent its silo's privacy
            if isinstance(reply, Reply):
                self.privacy.observe(silo, reply.config, r)
        state = self._aggregate(r, screened.accepted)
        if self.scaffold:
            sizes = dict(enumerate(ctx.fed.sizes))
            self.control = scaffold_server_update(
                self.control, {s: replies[s].arrays["control_delta"] for s in screened.accepted}, sizes)
        if self.averager is not None:
            self.averager.update(state)
        ok = sorted(screened.accepted)
        record = {
            "event": "round", "round": r + 1, "clients": selected, "aggregated": ok,
            "rejected": {str(s): reason for s, reason in screened.rejected.items()},
            "local_train_loss": {str(s): replies[s].config["mean_loss"] for s in ok
                                 if "mean_loss" in replies[s].config},  # none under DP: not a release
            **_global_losses(ctx, self.model, self.scheduler, state, ok),
            "train_time_s": round(time.perf_counter() - t0, 3),
            "bytes_down": sum(payload_nbytes(q.arrays) for q in sent),
            "bytes_up": sum(payload_nbytes(rep.arrays) for rep in replies.values() if isinstance(rep, Reply)),
        } | ({"compression": cfg.fl.compression} if cfg.fl.compression != "none" else {})
        return record, {s: screened.accepted[s][0] for s in ok}

    def _decoded(self, replies: dict[int, Reply | Failure]) -> dict[int, Reply | Failure]:
        """Compressed updates (fl.compression) as local weights, before the screen sees them."""
        if self.ctx.cfg.fl.compression == "none":
            return replies
        clip = self.ctx.cfg.privacy.max_grad_norm if self.privacy.server is not None else None
        return decoded_replies(replies, self.state, clip)


    def _aggregate(self, r: int, accepted: dict) -> State:
        """The round's aggregate (FedAvg, or client-level DP's noised mean), then the server optimiser's step."""
        account = self.privacy.server
        if account is None:
            target = self.server.aggregate(accepted)
        else:
            gen = secret_generator(party_secret(self.ctx.run.path / "privacy"), "client-dp", r)
            target = noised_mean_update(self.server.global_state, [accepted[s][0] for s in sorted(accepted)],
                                        self.ctx.cfg.fl.k, account.noise_multiplier,
                                        self.ctx.cfg.privacy.max_grad_norm, gen)
        self.server.global_state = self.server_optimizer.step(target)
        return self.server.global_state


def _announce_client_dp(ctx: RoundContext, privacy: RunPrivacy) -> None:
    """Print the epsilon client-level DP buys over the whole run, and warn when the noise drowns the updates."""
    a, fl, cfg = privacy.server, ctx.cfg.fl, ctx.cfg.privacy
    final = epsilon(a.accountant, a.noise_multiplier, a.sample_rate, fl.rounds, a.delta)
    ratio = noise_to_signal(a.noise_multiplier, cfg.max_grad_norm, fl.k, privacy.num_params)
    ctx.console.print(f"client-level DP-FedAvg: σ={a.noise_multiplier:.4g}, C={cfg.max_grad_norm:g}, q=K/N="
                      f"{fl.k}/{fl.clients}, {fl.rounds} rounds → ε={final:.3g} at δ={a.delta:g} "
                      f"({a.accountant} accountant)", highlight=False)
    if ratio > 1:
        ctx.console.print(f"[yellow]warning:[/] the server's noise has about {ratio:.0f}x the norm of the largest "
                          f"possible mean update (σ·sqrt(d)/K with d={privacy.num_params:,} parameters, K={fl.k}): "
                          f"client-level DP needs K in the thousands of clients per round for a useful model at "
                          f"this ε", highlight=False)


def _global_losses(ctx: RoundContext, model: torch.nn.Module, scheduler, state: State, silos: list[int]) -> dict:
    """The new global model's DDPM loss on each participating silo's data (computed by the silo) and on the real
    test set (computed by the coordinator, where it has one)."""
    n = ctx.cfg.log.loss_eval_samples
    if n == 0:
        return {"global_client_loss": {}, "global_client_loss_mean": float("nan"), "global_test_loss": None}
    if ctx.cfg.privacy.mode != "none":  # a loss on private data is a release the accountant does not cover
        silos = []
    requests = [Request(s, "evaluate", {"global": state}, {"max_samples": n}) for s in silos]
    replies = ctx.fed.pool.send(requests, timeout=ctx.cfg.runtime.round_timeout_s)
    per_client = {str(s): float(rep.config["loss"]) for s, rep in sorted(replies.items())
                  if isinstance(rep, Reply) and "loss" in rep.config}
    out = {"global_client_loss": per_client,
           "global_client_loss_mean": sum(per_client.values()) / len(per_client) if per_client else float("nan"),
           "bytes_eval_down": sum(payload_nbytes(q.arrays) for q in requests)}
    if ctx.fed.test is None:
        return out | {"global_test_loss": None, "global_test_loss_at": "not computed (no test set at the server)"}
    model.load_state_dict(state)
    test = evaluation_loss(model, scheduler, ctx.fed.test, max_samples=4 * n, seed=ctx.cfg.train.seed,
                           key="test", device=ctx.device)
    return out | {"global_test_loss": test, "global_test_loss_at": "server"}
