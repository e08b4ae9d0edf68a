"""`fedgen evaluate RUN`: a trained run's model scored against the real data this machine holds, as one metrics
record (appended to the run's metrics.jsonl), with the evaluation options resolved against the run's config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedgen import config as config_mod
from fedgen.config import Config, EvalConfig
from fedgen.core.errors import UsageError
from fedgen.data.prepare import load_for_config, load_reference
from fedgen.data.silos import SiloData
from fedgen.data.sources import ImageDataset
from fedgen.evaluation.evaluate import evaluate_model
from fedgen.evaluation.inception import check_inception_weights
from fedgen.evaluation.tstr import silo_baselines
from fedgen.federation.rundir import RunDir
from fedgen.runs.load import LoadedModel, load_run_model


def evaluation_options(cfg: Config, **given) -> EvalConfig:
    """The run's eval section with the options given on the command line (None: not given) put in, validated."""
    raw = cfg.eval.model_dump() | {k: v for k, v in given.items() if v is not None}
    return config_mod.validate(config_mod.to_dict(cfg) | {"eval": raw}).eval


def evaluate_run(run: Path, *, client: int | None = None, raw: bool = False, n: int | None = None,
                 sampler: str | None = None, steps: int | None = None, tstr: bool = False,
                 tstr_samples: int | None = None, inception_weights: Path | None = None,
                 guidance: float | None = None, fp32: bool = False, seed: int = 0, baselines: bool = True,
                 log: Callable[[str], None] = print, progress=None) -> tuple[dict, LoadedModel]:
    """Score the run's global model (or silo `client`'s): every option is checked before any work; the record is
    logged to the run's metrics and returned with the model it scored."""
    loaded = load_run_model(run, client=client, raw=raw)
    ev = evaluation_options(loaded.cfg, samples=n, sampler=sampler, steps=steps, tstr_samples=tstr_samples,
                            inception_weights=str(inception_weights) if inception_weights else None,
                            tstr=True if tstr else None, bf16=False if fp32 else None)
    if guidance is not None:
        loaded.cfg.diffusion.guidance = guidance
    if loaded.cfg.trains_generator:
        if sampler is not None or steps is not None or guidance is not None:
            raise UsageError(f"a {loaded.cfg.algorithm} run samples its generator directly: --sampler, --steps "
                             "and --guidance are for diffusion runs")
        labelled = loaded.sampler()
    else:
        labelled = loaded.sampler(ev.sampler, ev.steps, None, guidance, ev.bf16)  # checks the options first
    if ev.inception_weights:
        check_inception_weights(ev.inception_weights)
    ds = load_reference(loaded.cfg.data)
    record = evaluate_model(labelled, loaded.cfg, ds, ev, seed=seed, log=log, progress=progress)
    if ev.tstr and client is None and baselines:  # each silo's own CNN: as costly as TSTR itself
        record |= _silo_baselines(run, loaded.cfg, ds, ev, log, progress)
        if "local_real_accuracy_mean" in record:
            record["tstr_minus_local_mean"] = record["tstr_accuracy"] - record["local_real_accuracy_mean"]
    record = {"event": "evaluate", "round": loaded.round, "model": "global" if client is None else f"client {client}",
              "weights": loaded.weights, **record}
    RunDir(run).log(record)
    return record, loaded


def _silo_baselines(run: Path, cfg: Config, ds: ImageDataset, ev: EvalConfig, log: Callable[[str], None],
                    progress=None) -> dict:
    """Each silo's CNN on its own real data (the PGA paper's "local" column), where this machine holds the run's
    training data and its partition.json has the silos' indices (in-process and flower-sim runs)."""
    part, _ = RunDir(run).partition()
    train_split = load_for_config(cfg.data, cfg.train.seed).train
    train, test = SiloData.of(train_split.images, train_split.labels), SiloData.of(ds.test.images, ds.test.labels)
    log(f"training {len(part.client_indices)} silo baselines (each silo's CNN on its own data)")
    return silo_baselines(train.images, train.labels, part.client_indices, test.images, test.labels,
                          ds.num_classes, epochs=ev.classifier_epochs, seed=0, progress=progress)

