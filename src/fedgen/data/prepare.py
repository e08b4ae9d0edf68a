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


def load_for_config(cfg: DataConfig, seed: int) -> ImageDataset:
    """Load the configured dataset; apply `max_train_samples` as a class-stratified subset drawn with `seed`."""
    ds = load_reference(cfg)
    n = len(ds.train.labels)
    if cfg.max_train_samples is not None and cfg.max_train_samples < n:
        if cfg.max_train_samples < ds.num_classes:
            raise DatasetError(
                f"data.max_train_samples={cfg.max_train_samples} is below the number of classes ({ds.num_classes})"
            )
        keep, _ = train_test_split(np.arange(n), train_size=cfg.max_train_samples, random_state=seed % 2**32,
                                   stratify=ds.train.labels)
        keep = np.sort(keep)
        ds = replace(ds, train=ImageSplit(ds.train.images[keep], ds.train.labels[keep]))
    return ds
