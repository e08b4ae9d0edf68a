"""The in-process runtime: clients run one after another in this process (the default, fastest here)."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from fedgen import config as config_mod
from fedgen.config import Config
from fedgen.data.partition import Partition
from fedgen.errors import FedgenError
from fedgen.fl.client import FitResult, NonFiniteLossError, evaluation_loss
from fedgen.fl.experiment import Experiment, resolve_device
from fedgen.fl.rundir import Checkpoint, RunDir
from fedgen.fl.server import FedAvgServer
from fedgen.report.grid import sample_grid
from fedgen.report.progress import progress_bar, task


class TrainingAborted(FedgenError, RuntimeError):
    """A round failed; the run directory still holds the last good checkpoint."""


def train(cfg: Config, out: Path, console: Console | None = None) -> RunDir:
    """Train (or resume, or extend) the FedDM run described by `cfg` in directory `out`."""
    console = console or Console()
    run = RunDir(out)
    resuming = run.check(cfg)
    device = resolve_device(cfg.train.device)
    console.print(f"[bold]fedgen[/] run [cyan]{run.path}[/] on [green]{device}[/] "
                  f"({torch.get_num_threads()} CPU threads){' — resuming' if resuming else ''}")
    console.print("resolved config:\n" + _toml(cfg), highlight=False, markup=False)

    partition = Partition.load(run.partition_path) if run.partition_path.exists() else None
    run.check_rounds(cfg)
    exp = Experiment.build(cfg, device, partition)  # bad data fails here, before the directory is written
    run.write_config(cfg)
    if partition is None:
        exp.partition.save(run.partition_path)
    ckpt = run.load_checkpoint(device)
    meta = {"image_shape": list(exp.dataset.image_shape), "classes": exp.dataset.classes,
            "dataset": exp.dataset.name}
    if ckpt is None:
        state = {k: v.detach().clone() for k, v in exp.model.state_dict().items()}
        start, optimizer_state = 0, None
        run.truncate_metrics(0)
        run.log({"event": "start", "device": str(device), "num_params": sum(p.numel() for p in exp.model.parameters()),
                 "client_sizes": exp.partition.sizes.tolist(), **meta})
    else:
        state, start, optimizer_state = ckpt.global_state, ckpt.round, ckpt.optimizer_state
        run.truncate_metrics(start)
        console.print(f"resuming after round {start} (last complete checkpoint)")
    rounds = cfg.fl.rounds
    if start >= rounds:
        console.print(f"run already has {start} rounds (fl.rounds={rounds}); nothing to train")
        _write_final_samples(exp, run, rounds, state, console)
        return run

    server = FedAvgServer(len(exp.clients), exp.per_round, cfg.train.seed, state)
    settings = exp.train_settings()
    with progress_bar(console) as progress:
        rounds_task = progress.add_task("rounds", total=rounds, completed=start)
        for r in range(start, rounds):
            t0 = time.perf_counter()
            selected = server.select(r)
            results: dict[int, FitResult] = {}
            with task(progress, f"round {r + 1}: clients", len(selected)) as client_done:
                for cid in selected:
                    client = exp.clients[cid]
                    steps = settings.epochs * -(-len(client.data) // settings.batch_size)
                    with task(progress, f"client {cid}: steps", steps) as step_done:
                        try:
                            results[cid] = client.fit(server.global_state, r, settings, optimizer_state,
                                                      on_step=step_done)
                        except NonFiniteLossError as exc:
                            last = run.committed_rounds()
                            where = f"round {last[-1]}" if last else "none yet (no round completed)"
                            raise TrainingAborted(
                                f"round {r + 1} aborted: {exc}. Nothing was written for this round; the last good "
                                f"checkpoint in {run.checkpoints} is {where}. Lower train.lr or check the data."
                            ) from None
                    client_done()
            state = server.aggregate(results)
            optimizer_state = results[selected[0]].optimizer_state
            train_time = time.perf_counter() - t0
            record = {
                "event": "round", "round": r + 1, "clients": selected,
                "local_train_loss": {str(c): results[c].mean_loss for c in selected},
                **_global_losses(exp, state, selected),
                "train_time_s": round(train_time, 3),
                "bytes_down": server.model_bytes * len(selected),
                "bytes_up": server.model_bytes * len(results),
            }
            record["time_s"] = round(time.perf_counter() - t0, 3)
            # commit first: the round record, then the checkpoint. Samples and evaluation come after, so a failed
            # or killed evaluation never loses the round and a resume never repeats it.
            run.log(record)
            run.save_checkpoint(Checkpoint(r + 1, state, optimizer_state, meta),
                                {c: res.state for c, res in results.items()}, keep=cfg.log.keep_checkpoints)
            progress.advance(rounds_task)
            console.print(f"round {r + 1}/{rounds}: test loss {record['global_test_loss']:.4f}, "
                          f"mean client loss {record['global_client_loss_mean']:.4f}, {record['time_s']:.1f}s")
            last_round = r + 1 == rounds
            if last_round or (cfg.log.sample_every and (r + 1) % cfg.log.sample_every == 0):
                _after_commit(run, r + 1, "samples", console, partial(
                    _write_samples, exp, state, run.samples / f"round_{r + 1:04d}.png", console, progress))
            if cfg.eval.every and ((r + 1) % cfg.eval.every == 0 or last_round):
                _after_commit(run, r + 1, "evaluate", console, partial(_log_evaluation, exp, run, r + 1, state,
                                                                       console, progress))
    _write_final_samples(exp, run, rounds, state, console)
    return run


def _after_commit(run: RunDir, round_idx: int, what: str, console: Console, work) -> None:
    """Samples or evaluation of a committed round: a failure is logged and the run goes on."""
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - the round is committed; its extras must not stop training
        run.log({"event": f"{what}_failed", "round": round_idx, "error": f"{type(exc).__name__}: {exc}"})
        console.print(f"[yellow]warning:[/] {what} after round {round_idx} failed ({type(exc).__name__}: {exc}); "
                      "the round is committed and training goes on")


def _write_final_samples(exp: Experiment, run: RunDir, rounds: int, state, console: Console) -> None:
    """samples/final.png: the last round's grid, drawn now if it is missing (failed or interrupted)."""
    last = run.samples / f"round_{rounds:04d}.png"
    if not last.exists():
        _write_samples(exp, state, last, console)
    (run.samples / "final.png").write_bytes(last.read_bytes())
    console.print(f"done: samples in {run.samples / 'final.png'}, checkpoints in {run.checkpoints}")


def _global_losses(exp: Experiment, state, selected: list[int]) -> dict:
    """The new global model's DDPM loss on each participating client's data and on the test set."""
    n = exp.cfg.log.loss_eval_samples
    if n == 0:
        return {"global_client_loss": {}, "global_client_loss_mean": float("nan"), "global_test_loss": float("nan")}
    exp.model.load_state_dict(state)
    seed, device = exp.cfg.train.seed, exp.device
    per_client = {str(c): evaluation_loss(exp.model, exp.scheduler, exp.clients[c].data, max_samples=n, seed=seed,
                                          key=("client", c), device=device) for c in selected}
    test = evaluation_loss(exp.model, exp.scheduler, exp.test, max_samples=4 * n, seed=seed, key="test",
                           device=device)
    return {"global_client_loss": per_client,
            "global_client_loss_mean": sum(per_client.values()) / len(per_client),
            "global_test_loss": test}


def _log_evaluation(exp: Experiment, run: RunDir, round_idx: int, state, console: Console, progress) -> None:
    run.log({"event": "evaluate", "round": round_idx, "model": "global", **_evaluate(exp, state, console, progress)})


def _evaluate(exp: Experiment, state, console: Console, progress: Progress) -> dict:
    from fedgen.metrics.evaluate import evaluate_model

    exp.model.load_state_dict(state)
    record = evaluate_model(exp.model, exp.cfg, exp.reference, exp.cfg.eval, seed=exp.cfg.train.seed,
                            log=lambda m: console.print(m, highlight=False), progress=progress)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("fid_", "is_", "tstr_acc"))
                      and not k.endswith("_std"))
    console.print(f"evaluation: {shown}")
    return record


def _write_samples(exp: Experiment, state, path: Path, console: Console, progress: Progress | None = None) -> None:
    exp.model.load_state_dict(state)
    t0 = time.perf_counter()
    sample_grid(exp.model, exp.cfg.diffusion, exp.dataset.classes, exp.dataset.image_shape,
                exp.cfg.log.samples_per_class, path, seed=exp.cfg.train.seed, progress=progress)
    console.print(f"samples: {path} ({time.perf_counter() - t0:.1f}s)")


def _toml(cfg: Config) -> str:
    import tomli_w

    return tomli_w.dumps(config_mod.to_dict(cfg))
