"""Every named choice a config can make, defined once: the config's types are these Literals, and the modules
that implement the choices (data readers, samplers, server optimisers, discriminators) check against them."""

from __future__ import annotations

from typing import Literal, get_args

DatasetName = Literal["fashion-mnist", "mnist", "cifar10", "svhn", "image-folder", "digits"]
DATASETS: tuple[str, ...] = get_args(DatasetName)

SamplerName = Literal["ddpm", "ddim", "dpm-solver", "dpm-solver-3", "dpm-solver-sde", "unipc"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)

CompressionName = Literal["none", "fp16", "int8"]  # algorithms/feddm/compression.py

StrategyName = Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold"]
# the server optimisers that normalise each coordinate by a second moment (no server lr makes them plain averaging)
ADAPTIVE_STRATEGIES: tuple[str, ...] = ("fedadam", "fedyogi", "fedadagrad")

# PGA's discriminator zoo (nn/gan.py builds them), with what each one is
DISCRIMINATORS: dict[str, str] = {
    "dcgan": "DCGAN: two stride-2 convolutions (64, 128 channels) with BatchNorm and LeakyReLU",
    "resnet": "residual: two residual blocks with average-pool downsampling (32, 64 channels)",
    "wide": "wide and shallow: one stride-2 5x5 convolution with 128 channels, global max pooling",
    "mlp": "MLP on the flattened image and one-hot label (512, 256 units), no convolutions",
    "tiny": "narrow DCGAN without normalisation (16, 32 channels)",
}
