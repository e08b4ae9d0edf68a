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
from fedgen.fl.aggregate import sample_clients
from fedgen.fl.client import ClientData, DiffusionClient, NonFiniteLossError, PrivateFit, TrainSettings, evaluation_loss
from fedgen.fl.protocol import Reply, Request
from fedgen.fl.remedies import Proximal, ScaffoldCorrection


class SiloDataError(FedgenError):
    """A silo's data does not fit the run (other classes, another image shape, none at all)."""


class SiloStateError(FedgenError):
    """A silo's persistent state is missing or older than what the run's ledger says it released: it refuses to
    train rather than start a fresh privacy account (under-reporting epsilon) or a fresh noise secret (a second
    release of a redone round). The coordinator stops the run on it (fl/protocol.Failure.fatal)."""


def private_state(silo: int, store: SiloStateStore | None, account, known_steps: int, round_idx: int):
    """Check a DP party's loaded account against the `known_steps` the coordinator's ledger holds for it, and
    return its noise secret. A party with no account at all, or fewer steps than the ledger, or no secret after it
    released noise, refuses (SiloStateError naming the party and the folder)."""
    from fedgen.privacy.secret import MissingSecretError, party_secret

    if store is None:
        raise SiloDataError(f"silo {silo}: DP-SGD needs a state directory for its privacy account")
    where = f"its state folder {store.path}"
    keep = ("restore that folder from a backup (it must be kept for the life of the run), or point the silo at "
            "the folder it trained with; the run stays at its last checkpoint")
    if account is None and known_steps > 0:
        raise SiloStateError(f"silo {silo}: the run's privacy ledger has {known_steps} DP-SGD steps of this silo, "
                             f"but {where} holds no privacy account as of round {round_idx}; refusing to start "
                             f"again at epsilon = 0: {keep}")
    if account is not None and account.steps < known_steps:
        raise SiloStateError(f"silo {silo}: {where} holds a privacy account of {account.steps} DP-SGD steps, "
                             f"fewer than the {known_steps} the run's ledger has for it (an older copy?); "
                             f"refusing to under-report epsilon: {keep}")
    released = known_steps > 0 or (account is not None and account.steps > 0)
    try:
        return party_secret(store.path, create=not released)
    except MissingSecretError as exc:
        raise SiloStateError(f"silo {silo}: {where} has no noise secret ({exc.args[0]}) but this silo has "
                             f"released DP-noised results already; a new secret would make a redone round a "
                             f"second, unaccounted release: {keep}") from None


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


def planned_rounds(cfg: Config, silo: int) -> int:
    """How many of the run's rounds silo `silo` will train in: client selection is a public function of (seed,
    round), independent of any data, so a silo can budget its privacy over exactly its own participation."""
    if cfg.fl.centralized:
        return cfg.fl.rounds
    k = cfg.fl.k
    return sum(silo in sample_clients(cfg.fl.clients, k, cfg.train.seed, r) for r in range(cfg.fl.rounds))


def privacy_config_values(report: dict) -> dict:
    """An account's report as flat reply values (`dp_epsilon`, ...): Flower's ConfigRecord holds no None/dicts."""
    return {f"dp_{k}": v for k, v in report.items() if v is not None}


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

    def local_steps(self) -> int:
        """Optimizer steps of one fit (for progress bars)."""
        if self.cfg.privacy.mode == "dp-sgd":
            from fedgen.privacy.dpsgd import poisson_plan

            return self.settings.epochs * poisson_plan(len(self.data), self.settings.batch_size)[1]
        return self.settings.epochs * -(-len(self.data) // self.settings.batch_size)

    def _fit(self, request: Request) -> Reply:
        round_idx = int(request.config["round"])
        saved = self.store.load(round_idx) or {} if self.store is not None else {}
        account, private = self._private_fit(saved, round_idx, int(request.config.get("privacy_steps", 0)))
        remedy = self._remedy(request, saved)
        try:
            result = self.client.fit(request.arrays["global"], round_idx, self.settings, saved.get("optimizer"),
                                     on_step=self.on_step, private=private, remedy=remedy)
        except NonFiniteLossError as exc:
            return Reply(self.silo, config={"error": str(exc)})
        remedy_out = remedy.finish(result.steps) if remedy is not None else {}
        config = {"num_examples": result.num_examples, "steps": result.steps}
        if self.cfg.privacy.mode == "none":  # under DP, a loss on the silo's data would be an unaccounted release
            config["mean_loss"] = result.mean_loss
        state = result.state
        if account is not None:
            account.steps += result.steps
            config |= privacy_config_values(account.report())
        if self.cfg.privacy.mode == "client-dp":
            from fedgen.privacy.client_dp import clip_update

            state, norm = clip_update(state, request.arrays["global"], self.cfg.privacy.max_grad_norm)
            config["update_norm"] = norm
        if self.store is not None and (self.settings.keep_optimizer or account is not None or remedy_out):
            self.store.save(round_idx + 1, {"optimizer": result.optimizer_state,
                                            "privacy": account.to_dict() if account is not None else None,
                                            "control": remedy_out.get("control")})
        arrays = {"local": state} | ({"control_delta": remedy_out["control_delta"]} if remedy_out else {})
        return Reply(self.silo, arrays=arrays, config=config)

    def _remedy(self, request: Request, saved: dict):
        """FedProx's proximal term or SCAFFOLD's correction for this fit (fl/remedies.py), or None. SCAFFOLD's
        client variate c_i is the silo's own state, kept in its store from the last round it took part in."""
        fl = self.cfg.fl
        if fl.strategy == "fedprox":
            return Proximal(self.client.model, request.arrays["global"], fl.prox_mu)
        if fl.strategy != "scaffold":
            return None
        if self.store is None:
            raise SiloDataError(f"silo {self.silo}: SCAFFOLD needs a state directory for its control variate")
        return ScaffoldCorrection(self.client.model, request.arrays["global"], self.settings.lr,
                                  request.arrays["control"], saved.get("control"))

    def _private_fit(self, saved: dict, round_idx: int, known_steps: int):
        """(account, PrivateFit) for a DP-SGD silo, else (None, None). The account (sigma, q, steps so far) is the
        silo's own, kept in its store: opened on its first fit, for the rounds it will take part in. `known_steps`:
        the steps the coordinator's ledger holds for this silo (`private_state` refuses if the store has fewer)."""
        privacy = self.cfg.privacy
        if privacy.mode != "dp-sgd":
            return None, None
        from fedgen.privacy.accountant import Account, open_account
        from fedgen.privacy.dpsgd import poisson_plan
        from fedgen.privacy.secret import secret_generator

        q, per_epoch = poisson_plan(len(self.data), self.settings.batch_size)
        account = Account.from_dict(saved["privacy"]) if saved.get("privacy") else None
        secret = private_state(self.silo, self.store, account, known_steps, round_idx)
        if account is None:
            planned = planned_rounds(self.cfg, self.silo) * self.settings.epochs * per_epoch
            account = open_account(privacy, q, planned, len(self.data))
        return account, PrivateFit(account.noise_multiplier, privacy.max_grad_norm, q, per_epoch,
                                   privacy.noise_multiplicity, secret_generator(secret, "dp-fit", round_idx))

    def _evaluate(self, request: Request) -> Reply:
        if self.cfg.privacy.mode != "none":
            raise SiloDataError(f"silo {self.silo} answers no loss queries on its data under privacy.mode="
                                f"{self.cfg.privacy.mode}: the answer would not be covered by its privacy account")
        self.client.model.load_state_dict(request.arrays["global"])
        loss = evaluation_loss(self.client.model, self.client.scheduler, self.data,
                               max_samples=int(request.config["max_samples"]), seed=self.cfg.train.seed,
                               key=("client", self.silo), device=self.client.device)
        return Reply(self.silo, config={"loss": loss})
