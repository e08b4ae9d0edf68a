"""The presets: named starting points (`fedgen presets`), from the smoke test to the papers' settings."""

from __future__ import annotations

import copy
from typing import Any


def deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def _paper(dataset: str, description: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """The paper's setting: R=300, E=5, N=10 all participating, beta=0.5, batch 512, T=300, 32x32."""
    base: dict[str, Any] = {
        "description": description,
        "data": {"dataset": dataset, "image_size": 32, "beta": 0.5, "hflip": dataset == "cifar10"},
        "model": {"arch": "paper"},
        "diffusion": {"timesteps": 300, "schedule": "linear"},
        "fl": {"clients": 10, "rounds": 300, "local_epochs": 5},
        "train": {"batch_size": 512, "lr": 2e-4},
        "log": {"sample_every": 25},
    }
    for key, values in sections.items():
        base.setdefault(key, {}).update(values)
    return base


def _build_presets() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {
        "tiny": {
            "description": "scikit-learn digits, tiny U-Net, 2 rounds: seconds, samples still noise (the tests)",
            "data": {"dataset": "digits", "image_size": 8, "beta": 0.5},
            "model": {"arch": "tiny"},
            "diffusion": {"timesteps": 50, "schedule": "cosine"},
            "fl": {"clients": 4, "clients_per_round": 3, "rounds": 2, "local_epochs": 1},
            "train": {"batch_size": 64, "lr": 1e-3},
            "log": {"samples_per_class": 4, "loss_eval_samples": 64},
        },
        "fmnist-quick": {
            "description": "the default job: real Fashion-MNIST, 10 Dirichlet(0.5) clients, 2 sampled per round, "
            "30 rounds, small U-Net; minutes on 2 CPU cores",
            "data": {"dataset": "fashion-mnist", "beta": 0.5, "max_train_samples": 10000},
            "model": {"arch": "cpu-small"},
            # v-prediction with min-SNR-5 weights: at the same rounds and compute, domain FID 16.2 -> 6.4 and 63% ->
            # 80% of samples recognised as their label against the paper's epsilon objective (docs/PERFORMANCE.md)
            "diffusion": {"timesteps": 200, "schedule": "linear", "prediction": "v", "min_snr_gamma": 5.0},
            # K=2 of N=10: clients run one after another here, so at a fixed compute budget fewer clients per
            # round buy more rounds; measured, 30 rounds of 2 beat 6 rounds of 10 (docs/PERFORMANCE.md)
            "fl": {"clients": 10, "clients_per_round": 2, "rounds": 30, "local_epochs": 1},
            "train": {"batch_size": 32, "lr": 1e-3, "bf16": True},
            "log": {"sample_every": 0, "samples_per_class": 8, "loss_eval_samples": 64},
        },
    }
    # the first look: `tiny` trained long enough to draw digits (12 rounds: 86% of samples recognised as their
    # label by the digits classifier, against 15% after tiny's 2), with the default job's objective
    presets["smoke"] = deep_update(copy.deepcopy(presets["tiny"]), {
        "description": "the first look: scikit-learn digits, 4 clients, 12 rounds; about 30 s on 2 CPU cores, "
        "recognisable digits",
        "diffusion": {"prediction": "v", "min_snr_gamma": 5.0}, "fl": {"rounds": 12}})
    presets = {"smoke": presets.pop("smoke"), **presets}  # listed first: where a newcomer starts
    for dataset, short in (("fashion-mnist", "fmnist"), ("cifar10", "cifar10"), ("mnist", "mnist"),
                           ("svhn", "svhn")):
        presets[f"paper-{short}"] = _paper(dataset, f"the paper's default on {dataset}: N=10, beta=0.5, E=5, R=300")
        for beta in (0.1, 5.0):
            presets[f"paper-{short}-beta{beta:g}"] = _paper(
                dataset, f"the paper on {dataset} with Dirichlet beta={beta:g}", data={"beta": beta}
            )
        for n in (30, 50):
            presets[f"paper-{short}-n{n}"] = _paper(
                dataset, f"the paper on {dataset}: N={n} clients, K=10 sampled per round",
                fl={"clients": n, "clients_per_round": 10},
            )
        for e in (1, 10):
            presets[f"paper-{short}-e{e}"] = _paper(
                dataset, f"the paper on {dataset} with E={e} local epochs", fl={"local_epochs": e}
            )
        presets[f"paper-{short}-centralized"] = _paper(
            dataset, f"centralized baseline on {dataset}: same model, all data, R x E epochs",
            fl={"centralized": True},
        )
    zoo = ["dcgan", "resnet", "wide", "mlp", "tiny"]
    for dataset, short in (("fashion-mnist", "fmnist"), ("mnist", "mnist")):
        for parties in (1, 5, 10):
            # the paper: 1 party 100 epochs at batch 256; 5 and 10 parties 200 epochs at batch 128. An epoch is one
            # pass over a party's shard (60000 / parties images), i.e. that many generator steps; a round is one.
            batch, epochs = (256, 100) if parties == 1 else (128, 200)
            kinds = (zoo * 2)[:parties] if parties > 1 else ["dcgan"]
            base = {"algorithm": "pga", "data": {"dataset": dataset, "partition": "iid"},
                    "fl": {"clients": parties}, "pga": {"discriminators": kinds},
                    "log": {"samples_per_class": 8}}
            presets[f"pga-{short}-{parties}"] = deep_update(copy.deepcopy(base), {
                "description": f"PGA as the paper on {dataset}: {parties} part{'y' if parties == 1 else 'ies'} "
                f"({', '.join(kinds)}), {epochs} epochs at batch {batch}; GPU-sized",
                "fl": {"rounds": epochs}, "train": {"batch_size": batch},
                "pga": {"steps_per_round": -(-60000 // parties // batch)}})
            # CPU-scaled to about 15 minutes on 2 cores: a step costs one discriminator step per party
            rounds = {1: 30, 5: 15, 10: 10}[parties]
            presets[f"pga-{short}-{parties}-quick"] = deep_update(copy.deepcopy(base), {
                "description": f"PGA on {dataset}, {parties} part{'y' if parties == 1 else 'ies'}, CPU-scaled: "
                f"{rounds * 100:,} generator steps at batch 64 (15-20 minutes on 2 cores)",
                "fl": {"rounds": rounds}, "train": {"batch_size": 64}, "pga": {"steps_per_round": 100}})
    presets["pga-smoke"] = {
        "description": "PGA on scikit-learn digits: 3 parties, 3 discriminator kinds, seconds (tests, first look)",
        "algorithm": "pga",
        "data": {"dataset": "digits", "partition": "iid"},
        "fl": {"clients": 3, "rounds": 2},
        "train": {"batch_size": 32},
        "pga": {"discriminators": ["dcgan", "resnet", "mlp"], "steps_per_round": 5, "width": 16},
        "log": {"samples_per_class": 4},
    }
    presets["merf-smoke"] = {
        "description": "DP-MERF on scikit-learn digits: 3 silos release their embeddings once (dp-release, "
        "epsilon 10), the generator trains at the coordinator; seconds (tests, first look)",
        "algorithm": "merf",
        "data": {"dataset": "digits", "beta": 0.5},
        "fl": {"clients": 3, "rounds": 2},
        "train": {"batch_size": 64},
        "merf": {"features": 600, "steps_per_round": 20, "width": 16},
        "privacy": {"mode": "dp-release", "target_epsilon": 10.0},
        "log": {"samples_per_class": 4},
    }
    presets["dp-fmnist-quick"] = {
        "description": "the DP recipe: DP-MERF on Fashion-MNIST, 10 Dirichlet(0.5) silos, each releases its "
        "random-feature embedding once at record-level epsilon 10 (delta 1e-5); the generator trains at the "
        "coordinator; TSTR 0.67, 15 minutes of training on 2 shared CPU cores (docs/PERFORMANCE.md)",
        "algorithm": "merf",
        "data": {"dataset": "fashion-mnist", "beta": 0.5},
        "fl": {"clients": 10, "rounds": 15},
        "train": {"batch_size": 256},
        "merf": {"features": 6000, "steps_per_round": 100},
        "privacy": {"mode": "dp-release", "target_epsilon": 10.0},
        "log": {"samples_per_class": 8},
    }
    presets["paper-ct"] = _paper(
        "image-folder",
        "the paper's CT-scan setting for an image folder of class sub-folders: 64x64, batch 128 "
        "(set data.path)",
        data={"image_size": 64, "hflip": False},
        train={"batch_size": 128},
    )
    return presets


PRESETS: dict[str, dict[str, Any]] = _build_presets()
DEFAULT_PRESET = "fmnist-quick"  # what `fedgen train` builds on when no --preset is given
