"""A silo's side of FedDM: it holds its own data and answers the server's requests.

- `describe`: what the silo holds (size, per-class counts, classes, image shape), checked against the run's
  classes and image shape when the request names them;
- `fit`: E local epochs from the global weights (`DiffusionClient.fit`), reply with the local weights;
- `evaluate`: the given (global) model's DDPM loss on the silo's own data.

Every per-client number is computed here, where the data is; the server never sees an image. State that must
outlive one request (the centralized baseline's Adam state; later a discriminator, a control variate, a privacy
accountant) lives in the silo's `SiloStateStore`, versioned by round so that a resumed run finds exactly the state
of the last committed round.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedgen.config import Config
from fedgen.errors import FedgenError
from fedgen.fl.client import ClientData, DiffusionClient, NonFiniteLossError, TrainSettings, evaluation_loss
from fedgen.fl.protocol import Reply, Request


class SiloDataError(FedgenError):
    """A silo's data does not fit the run (other classes, another image shape, none at all)."""


class SiloStateStore:
    """Per-silo persistent state, one file per round: `save(r, state)` after round r, `load(r)` the state as of
    round r (the newest saved at or before r). Rounds after r (written by a run killed before it committed them)
    are ignored and overwritten when the round is redone."""

    def __init__(self, path: Path, keep: int = 2):
        self.path = Path(path)
        self.keep = keep

    def _file(self, round_idx: int) -> Path:
        return self.path / f"round_{round_idx:04d}.pt"

    def _rounds(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.path.glob("round_*.pt")) if self.path.exists() else []

    def load(self, round_idx: int) -> dict | None:
        usable = [r for r in self._rounds() if r <= round_idx]
        return torch.load(self._file(usable[-1]), weights_only=False) if usable else None

    def save(self, round_idx: int, state: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self._file(round_idx).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self._file(round_idx))
        older = [r for r in self._rounds() if r < round_idx]
        for r in older[: max(0, len(older) - (self.keep - 1))]:
            self._file(r).unlink(missing_ok=True)


def describe_silo(silo: int, data: ClientData, classes: list[str], request: Request) -> Reply:
    """What a silo holds (size, per-class counts, classes, image shape), checked against the run's classes and
    image shape where the request names them (any algorithm's `describe`)."""
    shape = list(data.images.shape[1:])
    want_classes, want_shape = request.config.get("classes"), request.config.get("image_shape")
    if want_classes is not None and list(want_classes) != list(classes):
        raise SiloDataError(f"silo {silo}: its data has classes {classes}, the run has {want_classes}")
    if want_shape is not None and list(want_shape) != shape:
        raise SiloDataError(f"silo {silo}: its images are {shape} (C, H, W), the run's are {list(want_shape)}")
    if len(data) == 0:
        raise SiloDataError(f"silo {silo} holds no images")
    counts = torch.bincount(data.labels, minlength=len(classes)).tolist()
    return Reply(silo, config={"size": len(data), "counts": counts, "classes": list(classes), "image_shape": shape})


def train_settings(cfg: Config, num_classes: int) -> TrainSettings:
    t = cfg.train
    return TrainSettings(epochs=cfg.fl.local_epochs, batch_size=t.batch_size, lr=t.lr, hflip=cfg.data.hflip,
                         bf16=t.bf16, seed=t.seed, label_dropout=t.label_dropout, null_label=num_classes,
                         keep_optimizer=cfg.fl.centralized)


class FedDMWorker:
    """Silo `silo` of a FedDM run. `model` is a work buffer (the in-process runtime shares one between silos)."""

    def __init__(self, cfg: Config, silo: int, data: ClientData, classes: list[str], model: torch.nn.Module,
                 scheduler, device: torch.device, store: SiloStateStore | None = None):
        self.cfg = cfg
        self.silo = silo
        self.data = data
        self.classes = classes
        self.client = DiffusionClient(silo, data, model, scheduler, device)
        self.settings = train_settings(cfg, len(classes))
        self.store = store
        self.on_step = None  # set by a runtime that shows per-step progress

    def handle(self, request: Request) -> Reply:
        if self.cfg.train.cpu_threads:
            torch.set_num_threads(self.cfg.train.cpu_threads)
        handler = {"describe": self._describe, "fit": self._fit, "evaluate": self._evaluate}.get(request.kind)
        if handler is None:
            raise ValueError(f"silo {self.silo}: unknown request kind {request.kind!r}")
        return handler(request)

    def _describe(self, request: Request) -> Reply:
        return describe_silo(self.silo, self.data, self.classes, request)

    def _fit(self, request: Request) -> Reply:
        round_idx = int(request.config["round"])
        optimizer_state = None
        if self.settings.keep_optimizer and self.store is not None:
            optimizer_state = (self.store.load(round_idx) or {}).get("optimizer")
        try:
            result = self.client.fit(request.arrays["global"], round_idx, self.settings, optimizer_state,
                                     on_step=self.on_step)
        except NonFiniteLossError as exc:
            return Reply(self.silo, config={"error": str(exc)})
        if self.settings.keep_optimizer and self.store is not None:
            self.store.save(round_idx + 1, {"optimizer": result.optimizer_state})
        return Reply(self.silo, arrays={"local": result.state},
                     config={"num_examples": result.num_examples, "mean_loss": result.mean_loss,
                             "steps": result.steps})

    def _evaluate(self, request: Request) -> Reply:
        self.client.model.load_state_dict(request.arrays["global"])
        loss = evaluation_loss(self.client.model, self.client.scheduler, self.data,
                               max_samples=int(request.config["max_samples"]), seed=self.cfg.train.seed,
                               key=("client", self.silo), device=self.client.device)
        return Reply(self.silo, config={"loss": loss})
