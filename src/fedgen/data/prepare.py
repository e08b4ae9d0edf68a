"""From a data config to what training needs: the dataset (optionally subset) and the client split."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from sklearn.model_selection import train_test_split

from fedgen.config import DataConfig
from fedgen.data.sources import DatasetError, ImageDataset, ImageSplit, load_dataset


def load_reference(cfg: DataConfig) -> ImageDataset:
    """The configured dataset's full real splits at the model's resolution (what metrics compare against).

    A function of the data config alone: where the dataset has no test split of its own, the held-out split
    comes from `data.split_seed`, never from the run's seed, so every run of a dataset is scored on the same
    test images and the same domain classifier.
    """
    return load_dataset(cfg.dataset, cfg.path, image_size=cfg.image_size, channels=cfg.channels,
                        test_fraction=cfg.test_fraction, seed=cfg.split_seed)


def training_indices(cfg: DataConfig, seed: int, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Which images of the full training split a run trains on: all, or the class-stratified subset of
    `max_train_samples` drawn with `seed` (sorted)."""
    n = len(labels)
    if cfg.max_train_samples is None or cfg.max_train_samples >= n:
        return np.arange(n)
    if cfg.max_train_samples < num_classes:
        raise DatasetError(
            f"data.max_train_samples={cfg.max_train_samples} is below the number of classes ({num_classes})"
        )
    keep, _ = train_test_split(np.arange(n), train_size=cfg.max_train_samples, random_state=seed % 2**32,
                               stratify=labels)
    return np.sort(keep)


def load_for_config(cfg: DataConfig, seed: int) -> ImageDataset:
    """Load the configured dataset; apply `max_train_samples` as a class-stratified subset drawn with `seed`."""
    ds = load_reference(cfg)
    keep = training_indices(cfg, seed, ds.train.labels, ds.num_classes)
    if len(keep) < len(ds.train.labels):
        ds = replace(ds, train=ImageSplit(ds.train.images[keep], ds.train.labels[keep]))
    return ds
