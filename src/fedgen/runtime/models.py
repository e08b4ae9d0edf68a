"""Load a trained model back from a run directory (global or a client's personalised model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import UNet2DModel

from fedgen.config import Config
from fedgen.fl.experiment import new_model, resolve_device
from fedgen.fl.rundir import RunDir, RunDirError


@dataclass
class LoadedModel:
    cfg: Config
    model: UNet2DModel
    classes: list[str]
    image_shape: tuple[int, int, int]
    round: int  # the round the model is from: the last committed round, or the client's last trained round
    source: str


def load_run_model(path: Path, client: int | None = None, device: str | None = None) -> LoadedModel:
    run = RunDir(path)
    cfg = run.config()
    dev = resolve_device(device or cfg.train.device)
    ckpt = run.load_checkpoint(dev)
    if ckpt is None:
        raise RunDirError(f"{path} has no completed round yet; train it first")
    classes, shape = ckpt.extra["classes"], tuple(ckpt.extra["image_shape"])
    model = new_model(cfg, shape, len(classes), dev)
    if client is None:
        model.load_state_dict(ckpt.global_state)
        source = f"the global model after round {ckpt.round}"
        return_round = ckpt.round
    else:
        state, trained_round = run.load_client_model(client, dev)
        model.load_state_dict(state)
        source = f"client {client}'s local model, last trained in round {trained_round} of {ckpt.round}"
        return_round = trained_round
    model.eval()
    return LoadedModel(cfg, model, classes, shape, return_round, source)
