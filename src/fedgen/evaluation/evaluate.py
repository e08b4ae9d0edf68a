"""Evaluate a trained model: generate labelled samples, then FID/KID/IS/precision-recall and TSTR.

Generated sets follow the real set's class counts (the paper: as many samples as the test set, with its
class counts, for FID; as many as the training set for TSTR). Every key names its extractor.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress
from safetensors.torch import load_file, save_file

from fedgen.config import Config, EvalConfig
from fedgen.core.paths import cache_dir
from fedgen.core.progress import task
from fedgen.data.sources import DatasetError, ImageDataset
from fedgen.data.transforms import to_tensor
from fedgen.evaluation.features import Extractor, domain_extractor
from fedgen.evaluation.generative import generative_metrics
from fedgen.evaluation.inception import inception_extractor
from fedgen.evaluation.tstr import tstr_accuracy


def labels_like(labels: np.ndarray, n: int, num_classes: int) -> torch.Tensor:
    """n labels with the class proportions of `labels` (largest remainder; exact counts when n == len)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    want = counts / counts.sum() * n
    base = np.floor(want).astype(np.int64)
    base[np.argsort(-(want - base), kind="stable")[: n - base.sum()]] += 1
    return torch.from_numpy(np.repeat(np.arange(num_classes), base))


def real_features(extractor: Extractor, key: str, split: str, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of a real split, cached per dataset and extractor."""
    path = cache_dir() / f"{key}-{extractor.name}-{split}-features.safetensors"
    if path.exists():
        t = load_file(path)
        return t["features"], t["logits"]
    feats, logits = extractor.features_and_logits(to_tensor(images))
    save_file({"features": feats.contiguous(), "logits": logits.contiguous()}, path)
    return feats, logits


@dataclass
class Generated:
    images: torch.Tensor
    labels: torch.Tensor
    seconds: float


def generate(sampler, labels: torch.Tensor, seed: int, progress: Progress | None = None,
             purpose: str = "") -> Generated:
    """One image per entry of `labels` from a labelled sampler; a progress bar when given one."""
    t0 = time.perf_counter()
    with task(progress, f"sampling {len(labels)} {purpose}".strip(),
              len(labels) * sampler.evaluations_per_image) as advance:
        x = sampler.images(labels, seed, progress=advance)
    return Generated(x, labels, time.perf_counter() - t0)


def inception_weights_path(ev: EvalConfig) -> str | None:
    return ev.inception_weights or os.environ.get("FEDGEN_INCEPTION_WEIGHTS")


MIN_REAL_TEST_IMAGES = 10  # precision/recall take k=3 nearest neighbours among the real test images
_said: set[str] = set()


def check_evaluable(ds: ImageDataset) -> None:
    """A dataset too small to score (a few test images of a small image folder) is the user's to fix: said before
    any classifier is trained or image generated."""
    n = len(ds.test.labels)
    if n < MIN_REAL_TEST_IMAGES:
        raise DatasetError(f"{ds.name}'s test split has {n} images; evaluation needs at least {MIN_REAL_TEST_IMAGES} "
                           "(add images, or a larger data.test_fraction for a folder without a test/ split)")


def evaluate_model(sampler, cfg: Config, ds: ImageDataset, ev: EvalConfig, *, seed: int = 0, log=print,
                   progress: Progress | None = None) -> dict:
    """All metrics of a labelled sampler (diffusion/pipeline.py) against the real splits of `ds`."""
    check_evaluable(ds)
    device = sampler.device
    t0 = time.perf_counter()
    extractor, info = domain_extractor(ds, device=device, epochs=ev.classifier_epochs, log=log)
    key = info["cache_key"]
    extractors = [extractor]
    weights = inception_weights_path(ev)
    if weights:
        extractors.append(inception_extractor(weights, device=device))
    elif "no-inception" not in _said:  # once per process, not at every evaluation of a run
        _said.add("no-inception")
        log("no Inception weights given (--inception-weights or FEDGEN_INCEPTION_WEIGHTS): domain metrics only")
    n = ev.samples or len(ds.test.labels)
    fake = generate(sampler, labels_like(ds.test.labels, n, ds.num_classes), seed, progress, "(FID set)")
    record: dict = {**sampler.describe(), "generated": n,
                    "sampling_s": round(fake.seconds, 2),
                    "domain_classifier": key,
                    "domain_classifier_real_test_accuracy": info["real_test_accuracy"]}
    for ex in extractors:
        real = {split: real_features(ex, key, split, getattr(ds, split).images) for split in ("train", "test")}
        feats, logits = ex.features_and_logits(fake.images)
        record |= generative_metrics(ex.name, {s: f for s, (f, _) in real.items()}, feats, logits)
        if ex is extractor:  # its classes are the dataset's: how many samples it recognises as their label
            record["label_agreement_domain"] = float((logits.argmax(1).cpu() == fake.labels).double().mean())
        record[f"notes_{ex.name}"] = ex.note
    if ev.tstr:
        m = ev.tstr_samples or len(ds.train.labels)
        syn = generate(sampler, labels_like(ds.train.labels, m, ds.num_classes), seed + 1, progress, "(TSTR set)")
        record["tstr_accuracy"] = tstr_accuracy(syn.images, syn.labels, to_tensor(ds.test.images),
                                                torch.from_numpy(ds.test.labels), ds.num_classes,
                                                epochs=ev.classifier_epochs, seed=info["seed"], device=device,
                                                progress=progress)
        record["tstr_generated"] = m
        record["tstr_sampling_s"] = round(syn.seconds, 2)
        record["real_train_real_test_accuracy"] = info["real_test_accuracy"]  # same CNN and recipe, real data
    record["time_s"] = round(time.perf_counter() - t0, 2)
    return record
