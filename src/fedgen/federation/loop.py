"""The one round loop of every runtime and every algorithm: round -> ledger -> log -> checkpoint -> samples and
evaluation. The algorithm (federation/algorithm.Algorithm: FedDM, PGA) computes a round; it reaches the silos
through a `Federation` (federation/silos.py): in-process workers, Flower's simulation engine or SuperNodes on
other machines. The run directory, resume, metrics, progress, samples and evaluation are the same for all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

import torch
from rich.console import Console

from fedgen.config import Config
from fedgen.core.device import emulated_bf16_note, resolve_device
from fedgen.core.errors import FedgenError
from fedgen.core.progress import progress_bar
from fedgen.core.warnings import quiet_known_warnings
from fedgen.evaluation.evaluate import evaluate_model
from fedgen.federation.algorithm import Algorithm, MakeAlgorithm, RoundContext, TrainingAborted
from fedgen.federation.rundir import RunDir
from fedgen.federation.silos import Federation
from fedgen.federation.tracking import Tracker
from fedgen.privacy.ledger import summary as privacy_summary
from fedgen.report.grid import sample_grid

__all__ = ["OpenFederation", "TrainingAborted", "train"]

# (config, run directory, device, console) -> a context manager yielding the run's Federation
OpenFederation = Callable[[Config, RunDir, torch.device, Console], AbstractContextManager[Federation]]


def train(cfg: Config, out: Path, console: Console, open_federation: OpenFederation,
          make_algorithm: MakeAlgorithm) -> RunDir:
    """Train (or resume, or extend) the run described by `cfg` in directory `out`."""
    quiet_known_warnings()  # again: Flower's simulation engine and Ray have reset the filters by now
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
            console.print(f"resolved config: {run.path / 'config.toml'}", highlight=False)
            slow = emulated_bf16_note(device, [name for name, on in (("train.bf16", cfg.train.bf16),
                                                                     ("eval.bf16", cfg.eval.bf16))
                                                if on and cfg.algorithm == "feddm"])
            if slow:
                console.print(f"note: {slow}", highlight=False)
            with open_federation(cfg, run, device, console) as fed:  # bad data fails here, before anything is written
                return _train(cfg, run, device, fed, console, make_algorithm)
        finally:  # in-process silos set it too; leave the caller's process as it was
            torch.set_num_threads(previous_threads)


def _train(cfg: Config, run: RunDir, device: torch.device, fed: Federation, console: Console,
           make_algorithm: MakeAlgorithm) -> RunDir:
    tracker = Tracker(cfg.log.tensorboard, run.path / "tensorboard")  # a missing package fails here, first
    try:
        return _train_rounds(cfg, run, device, fed, console, make_algorithm, tracker)
    finally:
        tracker.close()


def _train_rounds(cfg: Config, run: RunDir, device: torch.device, fed: Federation, console: Console,
                  make_algorithm: MakeAlgorithm, tracker: Tracker) -> RunDir:
    ctx = RoundContext(cfg, run, fed, device, console)
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
        num_params = sum(p.numel() for p in algorithm.network.parameters())
        run.log({"event": "start", "device": str(device), "runtime": fed.where, "algorithm": cfg.algorithm,
                 "num_params": num_params, "client_sizes": fed.sizes, **meta})
    else:
        start = ckpt.round
        algorithm.restore(ckpt)
        run.truncate_metrics(start)
        algorithm.privacy.restore(run.read_metrics(), start)
        run.log({"event": "resume", "after_round": start, "runtime": fed.where})
        console.print(f"resuming after round {start} (last complete checkpoint)")
    rounds = cfg.fl.rounds
    if start >= rounds:
        console.print(f"run already has {start} rounds (fl.rounds={rounds}); nothing to train")
        _write_final_samples(ctx, algorithm, rounds)
        return run
    said_privacy = None  # a round line names the privacy state when it changes (every round under DP), not always
    began = time.perf_counter()
    with progress_bar(console) as progress:
        ctx.progress = progress
        rounds_task = progress.add_task("rounds", total=rounds, completed=start)
        for r in range(start, rounds):
            t0 = time.perf_counter()
            record, silo_models = algorithm.round(r)
            record["privacy"] = algorithm.privacy.record(r + 1)
            record["time_s"] = round(time.perf_counter() - t0, 3)
            # commit first: the round record, then the checkpoint. Samples and evaluation come after, so a failed
            # or killed evaluation never loses the round and a resume never repeats it.
            run.log(record)
            tracker.record(record)
            run.save_checkpoint(algorithm.checkpoint(r + 1, meta), silo_models, keep=cfg.log.keep_checkpoints)
            privacy = privacy_summary(record["privacy"])
            console.print(f"round {r + 1}/{rounds}: {algorithm.summary(record)}, "
                          + ("" if privacy == said_privacy else f"{privacy}, ") + f"{record['time_s']:.1f}s",
                          highlight=False)
            said_privacy = privacy
            progress.advance(rounds_task)
            last_round = r + 1 == rounds
            if last_round or (cfg.log.sample_every and (r + 1) % cfg.log.sample_every == 0):
                grid = run.samples / f"round_{r + 1:04d}.png"
                _after_commit(ctx, r + 1, "samples", partial(_write_samples, ctx, algorithm, grid))
                if grid.exists():
                    tracker.image("samples", grid, r + 1)
            if cfg.eval.every and ((r + 1) % cfg.eval.every == 0 or last_round):
                _after_commit(ctx, r + 1, "evaluate", partial(_log_evaluation, ctx, algorithm, r + 1, tracker))
    _write_final_samples(ctx, algorithm, rounds)
    entry = algorithm.privacy.record(rounds)
    # the end of this invocation's training (a resumed or extended run has one per invocation)
    run.log({"event": "end", "round": rounds, "rounds_trained": rounds - start,
             "wall_s": round(time.perf_counter() - began, 3), "privacy": privacy_summary(entry)})
    console.print(f"{privacy_summary(entry)} after {rounds} rounds; the ledger: fedgen privacy {run.path}",
                  highlight=False)
    return run


def _after_commit(ctx: RoundContext, round_idx: int, what: str, work) -> None:
    """Samples or evaluation of a committed round: a failure is logged and the run goes on."""
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - the round is committed; its extras must not stop training
        ctx.run.log({"event": f"{what}_failed", "round": round_idx, "error": f"{type(exc).__name__}: {exc}"})
        ctx.console.print(f"[yellow]warning:[/] {what} after round {round_idx} failed ({type(exc).__name__}: "
                          f"{exc}); the round is committed and training goes on")


def _write_final_samples(ctx: RoundContext, algorithm: Algorithm, rounds: int) -> None:
    """samples/final.png: the last round's grid, drawn now if it is missing (failed or interrupted)."""
    run = ctx.run
    last = run.samples / f"round_{rounds:04d}.png"
    if not last.exists():
        _write_samples(ctx, algorithm, last)
    (run.samples / "final.png").write_bytes(last.read_bytes())
    ctx.console.print(f"done: samples in {run.samples / 'final.png'}, checkpoints in {run.checkpoints}")


def _write_samples(ctx: RoundContext, algorithm: Algorithm, path: Path) -> None:
    t0 = time.perf_counter()
    sample_grid(algorithm.sampler(), ctx.fed.classes, ctx.cfg.log.samples_per_class, path, seed=ctx.cfg.train.seed,
                progress=ctx.progress)
    ctx.console.print(f"samples: {path} ({time.perf_counter() - t0:.1f}s)")


def _log_evaluation(ctx: RoundContext, algorithm: Algorithm, round_idx: int, tracker: Tracker | None = None) -> None:
    record = {"event": "evaluate", "round": round_idx, "model": "global", "weights": algorithm.weights,
              **_evaluate(ctx, algorithm)}
    ctx.run.log(record)
    if tracker is not None:
        tracker.record(record, prefix="evaluate")


def _evaluate(ctx: RoundContext, algorithm: Algorithm) -> dict:
    if ctx.fed.reference is None:
        raise FedgenError("the coordinating side has no copy of the dataset to evaluate against")
    sampler = algorithm.sampler()  # diffusion: the evaluation sampler, steps and precision
    record = evaluate_model(sampler, ctx.cfg, ctx.fed.reference, ctx.cfg.eval, seed=ctx.cfg.train.seed,
                            log=lambda m: ctx.console.print(m, highlight=False), progress=ctx.progress)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("fid_", "is_", "tstr_acc"))
                      and not k.endswith("_std") and isinstance(v, float))
    ctx.console.print(f"evaluation: {shown}")
    return record
