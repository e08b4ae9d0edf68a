"""The one round loop of every runtime: select -> fit -> screen and aggregate -> log -> checkpoint -> samples and
evaluation. It reaches the silos through a `Federation` (runtime/federation.py): in-process workers, Flower's
simulation engine or SuperNodes on other machines; the loop, the run directory, resume, metrics, progress,
samples and evaluation are the same for all of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from fedgen import config as config_mod
from fedgen.config import Config
from fedgen.diffusion.schedule import ddpm_scheduler
from fedgen.errors import FedgenError
from fedgen.fl.aggregate import State
from fedgen.fl.client import evaluation_loss
from fedgen.fl.experiment import new_model, resolve_device
from fedgen.fl.protocol import Failure, Reply, Request, payload_nbytes
from fedgen.fl.remedies import scaffold_server_update
from fedgen.fl.rundir import Checkpoint, RunDir
from fedgen.fl.server import FedAvgServer
from fedgen.fl.server_opt import ServerOptimizer
from fedgen.privacy.ledger import RunPrivacy
from fedgen.privacy.ledger import summary as privacy_summary
from fedgen.report.grid import sample_grid
from fedgen.report.progress import progress_bar

# (config, run directory, device, console) -> a context manager yielding the run's Federation
OpenFederation = Callable[[Config, RunDir, torch.device, Console], AbstractContextManager]


class TrainingAborted(FedgenError, RuntimeError):
    """A round failed; the run directory still holds the last good checkpoint."""


def train(cfg: Config, out: Path, console: Console, open_federation: OpenFederation) -> RunDir:
    """Train (or resume, or extend) the FedDM run described by `cfg` in directory `out`."""
    run = RunDir(out)
    with run.lock():  # one writer per run directory, for the whole of training
        resuming = run.check(cfg)
        run.check_rounds(cfg)
        device = resolve_device(cfg.train.device)
        previous_threads = torch.get_num_threads()
        if cfg.train.cpu_threads:  # the coordinator's own work (PGA's generator) is thread-count dependent too
            torch.set_num_threads(cfg.train.cpu_threads)
        try:
            console.print(f"[bold]fedgen[/] run [cyan]{run.path}[/] on [green]{device}[/] "
                          f"({torch.get_num_threads()} CPU threads){' — resuming' if resuming else ''}")
            console.print("resolved config:\n" + _toml(cfg), highlight=False, markup=False)
            with open_federation(cfg, run, device, console) as fed:  # bad data fails here, before anything is written
                return _train(cfg, run, device, fed, console)
        finally:  # in-process silos set it too; leave the caller's process as it was
            torch.set_num_threads(previous_threads)


def _train(cfg: Config, run: RunDir, device: torch.device, fed, console: Console) -> RunDir:
    ctx = _Context(cfg, run, fed, device, console)
    algorithm = make_algorithm(ctx)  # a model that cannot take the data fails here, before anything is written
    run.write_config(cfg)
    if not run.partition_path.exists():
        fed.partition.save(run.partition_path)
    ckpt = run.load_checkpoint(device)
    meta = {"image_shape": list(fed.image_shape), "classes": fed.classes, "dataset": cfg.data.dataset,
            "algorithm": cfg.algorithm}
    if ckpt is None:
        start = 0
        run.truncate_metrics(0)
        run.log({"event": "start", "device": str(device), "runtime": fed.where, "algorithm": cfg.algorithm,
                 "num_params": sum(p.numel() for p in ctx.model.parameters()), "client_sizes": fed.sizes, **meta})
    else:
        start = ckpt.round
        algorithm.restore(ckpt.global_state, ckpt.optimizer_state, ckpt.ema)
        run.truncate_metrics(start)
        algorithm.privacy.restore(run.read_metrics(), start)
        run.log({"event": "resume", "after_round": start, "runtime": fed.where})
        console.print(f"resuming after round {start} (last complete checkpoint)")
    rounds = cfg.fl.rounds
    if start >= rounds:
        console.print(f"run already has {start} rounds (fl.rounds={rounds}); nothing to train")
        _write_final_samples(ctx, algorithm, rounds)
        return run
    with progress_bar(console) as progress:
        ctx.progress = progress
        rounds_task = progress.add_task("rounds", total=rounds, completed=start)
        for r in range(start, rounds):
            t0 = time.perf_counter()
            record, client_states = algorithm.round(r)
            record["privacy"] = algorithm.privacy.record(r + 1)
            record["time_s"] = round(time.perf_counter() - t0, 3)
            # commit first: the round record, then the checkpoint. Samples and evaluation come after, so a failed
            # or killed evaluation never loses the round and a resume never repeats it.
            run.log(record)
            run.save_checkpoint(Checkpoint(r + 1, algorithm.state, algorithm.optimizer_state, meta, algorithm.ema),
                                client_states,
                                keep=cfg.log.keep_checkpoints)
            console.print(f"round {r + 1}/{rounds}: {algorithm.summary(record)}, "
                          f"{privacy_summary(record['privacy'])}, {record['time_s']:.1f}s", highlight=False)
            progress.advance(rounds_task)
            last_round = r + 1 == rounds
            if last_round or (cfg.log.sample_every and (r + 1) % cfg.log.sample_every == 0):
                _after_commit(ctx, r + 1, "samples", partial(_write_samples, ctx, algorithm,
                                                             run.samples / f"round_{r + 1:04d}.png"))
            if cfg.eval.every and ((r + 1) % cfg.eval.every == 0 or last_round):
                _after_commit(ctx, r + 1, "evaluate", partial(_log_evaluation, ctx, algorithm, r + 1))
    _write_final_samples(ctx, algorithm, rounds)
    console.print(f"{privacy_summary(algorithm.privacy.record(rounds))} after {rounds} rounds; the ledger: "
                  f"fedgen privacy {run.path}", highlight=False)
    return run


class _Context:
    """What an algorithm's rounds need: the config, run directory, silos, device, console and progress."""

    def __init__(self, cfg, run, fed, device, console):
        self.cfg, self.run, self.fed, self.device, self.console = cfg, run, fed, device, console
        self.model: torch.nn.Module | None = None
        self.progress: Progress | None = None

    def last_checkpoint(self) -> str:
        last = self.run.committed_rounds()
        return f"round {last[-1]}" if last else "none yet (no round completed)"

    def stop_on_fatal(self, round_idx: int, replies: dict) -> None:
        """A silo that refused because its persistent state is missing or behind the ledger stops the run: going on
        without it would hide the problem, and it can never rejoin until its state is restored."""
        fatal = {s: f.reason for s, f in sorted(replies.items()) if isinstance(f, Failure) and f.fatal}
        if fatal:
            raise TrainingAborted(
                f"round {round_idx + 1} aborted: " + "; ".join(fatal.values()) + ". Nothing was written for this "
                f"round; the last good checkpoint in {self.run.checkpoints} is {self.last_checkpoint()}.")

    def abort(self, round_idx: int, accepted: int, asked: int, rejected: dict[int, str]) -> TrainingAborted:
        where = self.last_checkpoint()
        why = "; ".join(f"client {s}: {reason}" for s, reason in rejected.items())
        return TrainingAborted(
            f"round {round_idx + 1} aborted: {accepted} of {asked} clients returned a usable update, fewer than "
            f"fl.min_clients={self.cfg.fl.min_clients} ({why}). Nothing was written for this round; the last good "
            f"checkpoint in {self.run.checkpoints} is {where}; rerun the same command to resume from it."
        )


def make_algorithm(ctx: _Context):
    if ctx.cfg.algorithm == "pga":
        from fedgen.gan.generator import PGARounds

        return PGARounds(ctx)
    return FedDMRounds(ctx)


class FedDMRounds:
    """FedDM's server side (Algorithm 1): per round, select K silos, fit, screen, FedAvg, the silos' losses."""

    def __init__(self, ctx: _Context):
        cfg, fed = ctx.cfg, ctx.fed
        self.ctx = ctx
        ctx.model = new_model(cfg, fed.image_shape, fed.num_classes, ctx.device)
        self.scheduler = ddpm_scheduler(cfg.diffusion)
        state = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        per_round = 1 if cfg.fl.centralized else cfg.fl.k
        # client-level DP bounds each update by clipping; screening by the others' norms would make one client's
        # acceptance depend on another's data, outside the mechanism the accountant analyses
        outlier_ratio = math.inf if cfg.privacy.mode == "client-dp" else cfg.fl.max_update_norm_ratio
        self.scaffold = cfg.fl.strategy == "scaffold"
        self.server = FedAvgServer(len(fed.silos), per_round, cfg.train.seed, state, outlier_ratio,
                                   expects_control=self.scaffold)
        self.server_optimizer = ServerOptimizer(cfg.fl, state)  # fedavg: SGD at lr 1, plain averaging
        # SCAFFOLD's server variate c = sum_i p_i c_i (fl/remedies.py); each client's c_i lives with the client
        self.control = {k: torch.zeros_like(v) for k, v in state.items() if v.is_floating_point()} \
            if self.scaffold else None
        self.averager = WeightAverage(ctx.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.privacy = RunPrivacy(cfg, ctx.run.path, sum(p.numel() for p in ctx.model.parameters()))
        if self.privacy.server is not None:
            _announce_client_dp(ctx, self.privacy)

    @property
    def state(self) -> State:
        return self.server.global_state

    @property
    def ema(self) -> tuple[State, int] | None:
        return self.averager.state() if self.averager is not None else None

    @property
    def optimizer_state(self) -> dict | None:
        """The server's own state beyond the weights: its optimiser's (moments, float64 master weights) and
        SCAFFOLD's control variate; None for plain FedAvg (the centralized baseline's Adam lives with its silo)."""
        saved = {"server_optimizer": self.server_optimizer.state_dict(), "scaffold_control": self.control}
        return saved if any(v is not None for v in saved.values()) else None

    def restore(self, state: State, optimizer_state, ema: tuple[State, int] | None = None) -> None:
        saved = optimizer_state or {}
        self.server.global_state = state
        self.server_optimizer.load_state_dict(saved.get("server_optimizer"), state)
        if self.scaffold and saved.get("scaffold_control") is not None:
            self.control = saved["scaffold_control"]
        if self.averager is not None:
            self.averager.restore(ema)

    def sampler(self, raw: bool = False):
        """The global model as a labelled generator: its EMA weights, unless `raw` or the run keeps none."""
        from fedgen.models.labelled import DiffusionSampler
        from fedgen.models.unet import null_label

        use_ema = self.averager is not None and not raw
        self.ctx.model.load_state_dict(self.averager.state()[0] if use_ema else self.state)
        ev = self.ctx.cfg.eval  # training-time grids and evaluation use the evaluation sampler
        return DiffusionSampler(self.ctx.model, self.ctx.cfg.diffusion, self.ctx.fed.image_shape,
                                null_label(self.ctx.model, self.ctx.fed.num_classes), ev.sampler, ev.steps,
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
        screened = server.screen(selected, replies)
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
            **_global_losses(ctx, self.scheduler, state, ok),
            "train_time_s": round(time.perf_counter() - t0, 3),
            "bytes_down": sum(payload_nbytes(q.arrays) for q in sent),
            "bytes_up": sum(payload_nbytes(rep.arrays) for rep in replies.values() if isinstance(rep, Reply)),
        }
        return record, {s: screened.accepted[s][0] for s in ok}


    def _aggregate(self, r: int, accepted: dict) -> State:
        """The round's aggregate (FedAvg, or client-level DP's noised mean), then the server optimiser's step."""
        account = self.privacy.server
        if account is None:
            target = self.server.aggregate(accepted)
        else:
            from fedgen.privacy.client_dp import noised_mean_update
            from fedgen.privacy.secret import party_secret, secret_generator

            gen = secret_generator(party_secret(self.ctx.run.path / "privacy"), "client-dp", r)
            target = noised_mean_update(self.server.global_state, [accepted[s][0] for s in sorted(accepted)],
                                        self.ctx.cfg.fl.k, account.noise_multiplier,
                                        self.ctx.cfg.privacy.max_grad_norm, gen)
        self.server.global_state = self.server_optimizer.step(target)
        return self.server.global_state


def _announce_client_dp(ctx: _Context, privacy: RunPrivacy) -> None:
    """Print the epsilon client-level DP buys over the whole run, and warn when the noise drowns the updates."""
    from fedgen.privacy.accountant import epsilon
    from fedgen.privacy.client_dp import noise_to_signal

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


class WeightAverage:
    """The EMA of the global weights, kept by the server and updated after each aggregation: diffusers'
    `EMAModel` (decay min(`decay`, (1 + n) / (10 + n)) at update n, so the first rounds are not stuck near the
    initial weights)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        from diffusers.training_utils import EMAModel

        if len(model.state_dict()) != len(list(model.parameters())):
            raise ValueError("WeightAverage averages parameters: a model with buffers needs them carried too")
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.ema = EMAModel(model.parameters(), decay=decay)

    def update(self, state: State) -> None:
        self.model.load_state_dict(state)  # EMAModel averages parameters that require grad (else it copies)
        self.ema.step(self.model.parameters())

    def state(self) -> tuple[State, int]:
        """(the averaged weights as a model state, the number of updates)."""
        return ({n: p.detach().clone() for n, p in zip(self.names, self.ema.shadow_params, strict=True)},
                self.ema.optimization_step)

    def restore(self, saved: tuple[State, int] | None) -> None:
        if saved is None:  # a run from before EMA existed: start averaging from the current weights
            return
        state, updates = saved
        self.ema.load_state_dict({"optimization_step": updates, "shadow_params": [state[n] for n in self.names]})


def _global_losses(ctx: _Context, scheduler, state: State, silos: list[int]) -> dict:
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
    ctx.model.load_state_dict(state)
    test = evaluation_loss(ctx.model, scheduler, ctx.fed.test, max_samples=4 * n, seed=ctx.cfg.train.seed,
                           key="test", device=ctx.device)
    return out | {"global_test_loss": test, "global_test_loss_at": "server"}


def _after_commit(ctx: _Context, round_idx: int, what: str, work) -> None:
    """Samples or evaluation of a committed round: a failure is logged and the run goes on."""
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - the round is committed; its extras must not stop training
        ctx.run.log({"event": f"{what}_failed", "round": round_idx, "error": f"{type(exc).__name__}: {exc}"})
        ctx.console.print(f"[yellow]warning:[/] {what} after round {round_idx} failed ({type(exc).__name__}: "
                          f"{exc}); the round is committed and training goes on")


def _write_final_samples(ctx: _Context, algorithm, rounds: int) -> None:
    """samples/final.png: the last round's grid, drawn now if it is missing (failed or interrupted)."""
    run = ctx.run
    last = run.samples / f"round_{rounds:04d}.png"
    if not last.exists():
        _write_samples(ctx, algorithm, last)
    (run.samples / "final.png").write_bytes(last.read_bytes())
    ctx.console.print(f"done: samples in {run.samples / 'final.png'}, checkpoints in {run.checkpoints}")


def _write_samples(ctx: _Context, algorithm, path: Path) -> None:
    t0 = time.perf_counter()
    sample_grid(algorithm.sampler(), ctx.fed.classes, ctx.cfg.log.samples_per_class, path, seed=ctx.cfg.train.seed,
                progress=ctx.progress)
    ctx.console.print(f"samples: {path} ({time.perf_counter() - t0:.1f}s)")


def _log_evaluation(ctx: _Context, algorithm, round_idx: int) -> None:
    weights = "ema" if getattr(algorithm, "averager", None) is not None else "raw"
    ctx.run.log({"event": "evaluate", "round": round_idx, "model": "global", "weights": weights,
                 **_evaluate(ctx, algorithm)})


def _evaluate(ctx: _Context, algorithm) -> dict:
    from fedgen.metrics.evaluate import evaluate_model

    if ctx.fed.reference is None:
        raise FedgenError("the coordinating side has no copy of the dataset to evaluate against")
    generator = algorithm.sampler()  # diffusion: the evaluation sampler, steps and precision
    record = evaluate_model(generator, ctx.cfg, ctx.fed.reference, ctx.cfg.eval, seed=ctx.cfg.train.seed,
                            log=lambda m: ctx.console.print(m, highlight=False), progress=ctx.progress)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("fid_", "is_", "tstr_acc"))
                      and not k.endswith("_std") and isinstance(v, float))
    ctx.console.print(f"evaluation: {shown}")
    return record


def _toml(cfg: Config) -> str:
    import tomli_w

    return tomli_w.dumps(config_mod.to_dict(cfg))
