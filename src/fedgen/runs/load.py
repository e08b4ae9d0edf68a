"""Load a trained model back from a run directory (the global model, or a silo's personalised one)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel

from fedgen.algorithms.silos import new_network
from fedgen.config import Config
from fedgen.core.device import resolve_device
from fedgen.core.errors import UsageError
from fedgen.diffusion.pipeline import DiffusionSampler
from fedgen.federation.algorithm import LabelledSampler
from fedgen.federation.rundir import RunDir, RunDirError
from fedgen.nn.gan import GANSampler
from fedgen.nn.unet import null_label


@dataclass
class LoadedModel:
    cfg: Config
    model: UNet2DModel | torch.nn.Module  # the U-Net, or PGA's generator
    classes: list[str]
    image_shape: tuple[int, int, int]
    round: int  # the round the model is from: the last committed round, or the client's last trained round
    source: str
    weights: str = "raw"  # "ema" (the server's average of the global weights), "raw", or "client"

    def sampler(self, sampler: str = "ddpm", steps: int | None = None, sigma: str | None = None,
                guidance: float | None = None, bf16: bool | None = None) -> LabelledSampler:
        """This model as a labelled sampler (diffusion/pipeline.py, nn/gan.py); the sampler options apply to
        diffusion runs."""
        if self.cfg.trains_generator:
            if sampler != "ddpm" or steps is not None or sigma is not None or guidance is not None:
                raise UsageError(f"a {self.cfg.algorithm} run samples its generator directly: --sampler, --steps, "
                                 "--sigma and --guidance are for diffusion runs")
            return GANSampler(self.model)
        diffusion = DiffusionSampler(self.model, self.cfg.diffusion, self.image_shape,
                                     null_label(self.model, len(self.classes)), sampler, steps, sigma, guidance,
                                     self.cfg.eval.bf16 if bf16 is None else bf16)
        diffusion.check()
        return diffusion


def load_run_model(path: Path, client: int | None = None, device: str | None = None,
                   raw: bool = False) -> LoadedModel:
    """The run's global model (its EMA weights where the run keeps them, unless `raw`) or a client's."""
    run = RunDir(path)
    cfg = run.config()
    dev = resolve_device(device or cfg.train.device)
    ckpt = run.load_checkpoint(dev)
    if ckpt is None:
        raise RunDirError(f"{path} has no completed round yet; train it first")
    classes, shape = ckpt.extra["classes"], tuple(ckpt.extra["image_shape"])
    if cfg.trains_generator and client is not None:
        raise RunDirError(f"a {cfg.algorithm} run has one model, the generator: its silos train none")
    model = new_network(cfg, shape, len(classes), dev)
    weights = "client"
    if client is None:
        use_ema = ckpt.ema is not None and not raw
        model.load_state_dict(ckpt.ema[0] if use_ema else ckpt.global_state)
        weights = "ema" if use_ema else "raw"
        what = "generator" if cfg.trains_generator else \
            "global model (EMA weights)" if use_ema else "global model (raw weights)"
        source = f"the {what} after round {ckpt.round}"
        return_round = ckpt.round
    else:
        state, trained_round = run.load_silo_model(client, dev)
        model.load_state_dict(state)
        source = f"client {client}'s local model, last trained in round {trained_round} of {ckpt.round}"
        return_round = trained_round
    model.eval()
    return LoadedModel(cfg, model, classes, shape, return_round, source, weights)
