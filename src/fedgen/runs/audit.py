"""`fedgen audit RUN`: the audits of evaluation/audit.py on a run's global model, as one metrics record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedgen.core.errors import UsageError
from fedgen.core.progress import task
from fedgen.data.prepare import load_reference, training_indices
from fedgen.data.silos import make_partition
from fedgen.data.transforms import to_tensor
from fedgen.diffusion.schedule import ddpm_scheduler
from fedgen.evaluation import audit
from fedgen.evaluation.evaluate import generate, labels_like
from fedgen.federation.rundir import RunDir
from fedgen.runs.load import LoadedModel


def _member_partition(run: RunDir, cfg, labels: np.ndarray, num_classes: int):
    """The run's split with each silo's image indices. A Flower run's partition.json has only the counts the
    silos reported; where the silos took their shares of the dataset this machine holds (no `--data` of their
    own), the split is recomputed from the config, exactly as each silo computed it, and checked against those
    counts."""
    part, _ = run.partition()
    if sum(len(idx) for idx in part.client_indices) > 0:
        return part
    again = make_partition(cfg, labels, num_classes)
    if again.counts.shape != part.counts.shape or not (again.counts == part.counts).all():
        raise UsageError(f"{run.path}: the silos trained on data of their own (their per-class counts are not the "
                         "run's split of the dataset here), so this machine holds none of their images to audit "
                         "membership against; run the audit where a silo's data is")
    return again


def _targets(run: RunDir, cfg, n: int, silo: int | None, seed: int):
    """Members (training images of the run's silos, or of one) and as many non-members of the same distribution
    that no silo trained on; also every training image (for memorisation)."""
    ref = load_reference(cfg.data)
    keep = training_indices(cfg.data, cfg.train.seed, ref.train.labels, ref.num_classes)
    part = _member_partition(run, cfg, ref.train.labels[keep], ref.num_classes)
    if silo is not None and not 0 <= silo < len(part.client_indices):
        raise UsageError(f"--silo {silo}: the run has silos 0..{len(part.client_indices) - 1}")
    silos = [silo] if silo is not None else range(len(part.client_indices))
    members = keep[np.concatenate([part.client_indices[s] for s in silos])]
    unused = np.setdiff1d(np.arange(len(ref.train.labels)), keep)
    if len(unused):
        pool_images, pool_labels = ref.train.images[unused], ref.train.labels[unused]
        source = f"training-split images outside the run's subset ({len(unused)} available)"
    else:
        pool_images, pool_labels = ref.test.images, ref.test.labels
        source = f"the test split ({len(pool_labels)} images; the run trained on the whole training split)"
    m = min(n, len(members), len(pool_labels))
    if m < 20:
        raise UsageError(f"only {m} members or non-members available: too few to audit")
    rng = np.random.default_rng(seed)
    mi = np.sort(rng.choice(members, m, replace=False))
    ni = np.sort(rng.choice(len(pool_labels), m, replace=False))
    images = to_tensor(np.concatenate([ref.train.images[mi], pool_images[ni]]))
    labels = torch.from_numpy(np.concatenate([ref.train.labels[mi], pool_labels[ni]]))
    targets = audit.Targets(images, labels, np.r_[np.ones(m, bool), np.zeros(m, bool)])
    return targets, to_tensor(ref.train.images[keep]), source


def _attack_record(prefix: str, members: np.ndarray, others: np.ndarray, seed: int, privacy: dict | None) -> dict:
    out = {f"{prefix}_{k}": v for k, v in audit.attack_stats(members, others).items()}
    out |= {f"{prefix}_{k}": v for k, v in audit.bootstrap_intervals(members, others, seed=seed).items()}
    out[f"{prefix}_targets"] = [len(members), len(others)]
    out[f"{prefix}_roc"] = audit.roc_curve(members, others)
    if privacy is not None:
        out |= {f"{prefix}_{k}": v for k, v in audit.dp_check(members, others, privacy["epsilon"],
                                                               privacy["delta"]).items()}
    return out


def audit_run(path: Path, loaded: LoadedModel, *, n: int = 1000, generated: int = 2000, silo: int | None = None,
              seed: int = 0, timesteps: int = 8, draws: int = 2, copy_ratio: float = 1 / 3, log=print,
              progress=None) -> dict:
    """The audit record of `loaded` (runs/load.load_run_model of the run at `path`)."""
    run = RunDir(path)
    cfg = loaded.cfg
    rounds = [r for r in run.read_metrics() if r.get("event") == "round"]
    entry = rounds[-1].get("privacy") if rounds else None
    privacy = entry if isinstance(entry, dict) and "epsilon" in entry else None
    targets, train_x, source = _targets(run, cfg, n, silo, seed)
    m = int(targets.member.sum())
    record: dict = {"weights": loaded.weights, "members": m, "non_members": m, "non_member_source": source,
                    "member_silos": "all" if silo is None else silo}
    if privacy is not None:
        record |= {"dp_epsilon": privacy["epsilon"], "dp_delta": privacy["delta"], "dp_unit": privacy["unit"]}
        if privacy["unit"] == "client":
            log("note: a client-level epsilon bounds what one silo's whole data changes; the record-level attacks "
                "below are checked against it (a record is part of one silo)")
    if cfg.algorithm == "feddm":
        grid = audit.timestep_grid(cfg.diffusion.timesteps, timesteps)
        log(f"loss attack: {2 * m} targets x {len(grid)} timesteps x {draws} noise draws")
        with task(progress, "loss attack", 2 * m * len(grid) * draws) as advance:
            scores = audit.loss_scores(loaded.model, ddpm_scheduler(cfg.diffusion), targets, grid, draws, seed,
                                       progress=advance)
        chosen = audit.loss_attack(scores, targets.member, grid, seed)
        record["mia_loss_timestep"] = chosen["timestep"]
        record["mia_loss_calibration_auc_by_timestep"] = chosen["calibration_auc_by_timestep"]
        record |= _attack_record("mia_loss", chosen["members"], chosen["others"], seed, privacy)
    sampler = loaded.sampler() if cfg.trains_generator else loaded.sampler(cfg.eval.sampler, cfg.eval.steps)
    labels = labels_like(targets.labels.numpy(), generated, len(loaded.classes))
    fake = generate(sampler, labels, seed + 1, progress, "(audit)")
    record |= {"generated": generated, **sampler.describe()}
    dist = audit.distance_scores(targets, fake.images, fake.labels)
    record |= _attack_record("mia_distance", dist[targets.member], dist[~targets.member], seed, privacy)
    mem = audit.memorisation(fake.images, train_x, copy_ratio=copy_ratio)
    png = run.path / "audit" / f"nearest_pairs_round_{loaded.round:04d}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    audit.pairs_image(fake.images, train_x, mem["ratio"], mem["nearest"], png, distance=mem["nearest_distance"],
                      copy_ratio=copy_ratio)
    record |= {"memorisation_ratio_median": float(np.median(mem["ratio"])),
               "memorisation_ratio_min": float(mem["ratio"].min()),
               "memorisation_near_copies": int((mem["ratio"] < copy_ratio).sum()),
               "memorisation_copy_ratio": copy_ratio, "memorisation_neighbours": mem["k"],
               "memorisation_nearest_distance_median": float(np.median(mem["nearest_distance"])),
               "memorisation_png": str(png)}
    return record
