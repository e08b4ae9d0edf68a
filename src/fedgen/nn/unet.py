"""Class-conditional epsilon-prediction U-Net (diffusers `UNet2DModel`) and its size presets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DModel

from fedgen.config import Config, ModelConfig
from fedgen.core.errors import UsageError
from fedgen.core.seeding import derive_seed


@dataclass(frozen=True)
class UNetShape:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[int, ...]  # down levels (0 = full resolution) with self-attention


ARCHS: dict[str, UNetShape] = {
    # a few seconds per round on tiny images: tests and the smoke preset
    "tiny": UNetShape((16, 32), 1, ()),
    # ~1M parameters, residual blocks, attention only in the middle block: CPU training
    "cpu-small": UNetShape((32, 64, 64), 1, ()),
    # comparable to the paper's residual U-Net with 64 base channels (DDPM layout: attention at 16x16)
    "paper": UNetShape((64, 128, 256, 256), 2, (1,)),
}


def unet_shape(cfg: ModelConfig) -> UNetShape:
    if cfg.arch != "custom":
        return ARCHS[cfg.arch]
    if not cfg.block_out_channels or cfg.layers_per_block is None:
        raise UsageError("model.arch='custom' needs model.block_out_channels and model.layers_per_block")
    return UNetShape(tuple(cfg.block_out_channels), cfg.layers_per_block, tuple(cfg.attention_levels or ()))


def null_label(model: UNet2DModel, num_classes: int) -> int | None:
    """The null class of a model trained with label dropout (classifier-free guidance), else None."""
    return num_classes if model.config.num_class_embeds == num_classes + 1 else None


def build_unet(cfg: ModelConfig, image_shape: tuple[int, int, int], num_classes: int) -> UNet2DModel:
    """U-Net for images of `image_shape` (C, H, W), conditioned on a class label in [0, num_classes)."""
    shape = unet_shape(cfg)
    channels, height, width = image_shape
    factor = 2 ** (len(shape.block_out_channels) - 1)
    if height % factor or width % factor:
        raise UsageError(
            f"image size {height}x{width} must be divisible by {factor} for model.arch={cfg.arch!r} "
            f"({len(shape.block_out_channels)} levels); set data.image_size"
        )
    levels = range(len(shape.block_out_channels))
    down = tuple("AttnDownBlock2D" if i in shape.attention_levels else "DownBlock2D" for i in levels)
    up = tuple(reversed(["AttnUpBlock2D" if i in shape.attention_levels else "UpBlock2D" for i in levels]))
    groups = min(32, shape.block_out_channels[0] // 4)
    return UNet2DModel(
        sample_size=(height, width),
        in_channels=channels,
        out_channels=channels,
        block_out_channels=shape.block_out_channels,
        layers_per_block=shape.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=groups,
        attention_head_dim=min(64, shape.block_out_channels[-1]),
        num_class_embeds=num_classes,
    )


def new_unet(cfg: Config, image_shape: tuple[int, int, int], num_classes: int, device: torch.device) -> UNet2DModel:
    """The run's U-Net, initialised from the run seed (the same weights in every process that builds it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.train.seed, "init"))
        extra = 1 if cfg.train.label_dropout > 0 else 0  # the null label of classifier-free guidance
        return build_unet(cfg.model, image_shape, num_classes + extra).to(device)
