"""A silo's side of FedDM: it holds its own data and answers the server's requests.

- `describe`: what the silo holds (size, per-class counts, classes, image shape), checked against the run's
  classes and image shape when the request names them (federation/silos.describe_silo);
- `fit`: E local epochs from the global weights (`LocalUpdate.fit`), reply with the local weights;
- `evaluate`: the given (global) model's DDPM loss on the silo's own data.

Every per-silo number is computed here, where the data is; the server never sees an image. State that must
outlive one request (the centralized baseline's Adam state, SCAFFOLD's client variate, the privacy account) lives
in the silo's `SiloStateStore`, versioned by round so that a resumed run finds exactly the state of the last
committed round.
"""

from __future__ import annotations

import torch

from fedgen.algorithms.feddm.compression import compress
from fedgen.algorithms.feddm.local_update import LocalUpdate, NonFiniteLossError, TrainSettings, evaluation_loss
from fedgen.algorithms.feddm.remedies import LocalRemedy, Proximal, ScaffoldCorrection
from fedgen.config import Config
from fedgen.core.errors import SiloDataError
from fedgen.core.records import Reply, Request
from fedgen.data.silos import SiloData
from fedgen.federation.selection import sample_silos
from fedgen.federation.silo_state import SiloStateStore
from fedgen.federation.silos import describe_silo
from fedgen.privacy.accountant import Account, open_account
from fedgen.privacy.client_dp import clip_update
from fedgen.privacy.dpsgd import DPSGD, poisson_plan
from fedgen.privacy.ledger import report_values
from fedgen.privacy.secret import secret_generator
from fedgen.privacy.silo_account import checked_secret


def train_settings(cfg: Config, num_classes: int) -> TrainSettings:
    t = cfg.train
    return TrainSettings(epochs=cfg.fl.local_epochs, batch_size=t.batch_size, lr=t.lr, hflip=cfg.data.hflip,
                         bf16=t.bf16, seed=t.seed, label_dropout=t.label_dropout, null_label=num_classes,
                         keep_optimizer=cfg.fl.centralized, min_snr_gamma=cfg.diffusion.min_snr_gamma,
                         lr_decay_rounds=t.lr_decay_rounds, lr_final_ratio=t.lr_final_ratio,
                         warmup_steps=t.warmup_steps, adam_betas=t.adam_betas,
                         timestep_sampling=cfg.diffusion.timestep_sampling,
                         lognormal=(cfg.diffusion.lognormal_mean, cfg.diffusion.lognormal_std))


def planned_rounds(cfg: Config, silo: int) -> int:
    """How many of the run's rounds silo `silo` will train in: client selection is a public function of (seed,
    round), independent of any data, so a silo can budget its privacy over exactly its own participation."""
    if cfg.fl.centralized:
        return cfg.fl.rounds
    k = cfg.fl.k
    return sum(silo in sample_silos(cfg.fl.clients, k, cfg.train.seed, r) for r in range(cfg.fl.rounds))


class FedDMSilo:
    """Silo `silo` of a FedDM run (a `core.records.Worker`). `model` is a work buffer (the in-process runtime
    shares one between silos)."""

    def __init__(self, cfg: Config, silo: int, data: SiloData, classes: list[str], model: torch.nn.Module,
                 scheduler, device: torch.device, store: SiloStateStore | None = None):
        self.cfg = cfg
        self.silo = silo
        self.data = data
        self.classes = classes
        self.local = LocalUpdate(silo, data, model, scheduler, device)
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

    def steps(self, request: Request) -> int:
        """Optimizer steps of one fit (for progress bars); other requests train nothing."""
        if request.kind != "fit":
            return 0
        if self.cfg.privacy.mode == "dp-sgd":
            return self.settings.epochs * poisson_plan(len(self.data), self.settings.batch_size)[1]
        return self.settings.epochs * -(-len(self.data) // self.settings.batch_size)

    def _fit(self, request: Request) -> Reply:
        round_idx = int(request.config["round"])
        saved = self.store.load(round_idx) or {} if self.store is not None else {}
        private = self._private_fit(saved, round_idx, int(request.config.get("privacy_steps", 0)))
        remedy = self._remedy(request, saved)
        try:
            result = self.local.fit(request.arrays["global"], round_idx, self.settings, saved.get("optimizer"),
                                    on_step=self.on_step, private=private, remedy=remedy)
        except NonFiniteLossError as exc:
            return Reply(self.silo, config={"error": str(exc)})
        remedy_out = remedy.finish(result.steps) if remedy is not None else {}
        config = {"num_examples": result.num_examples, "steps": result.steps}
        if self.cfg.privacy.mode == "none":  # under DP, a loss on the silo's data would be an unaccounted release
            config["mean_loss"] = result.mean_loss
        state = result.state
        account = private.account if private is not None else None  # its steps advanced with the update's
        if account is not None:
            config |= report_values(account.report())
        if self.cfg.privacy.mode == "client-dp":
            state, norm = clip_update(state, request.arrays["global"], self.cfg.privacy.max_grad_norm)
            config["update_norm"] = norm
        update, residual = self._compressed(state, request.arrays["global"], saved)
        if self.store is not None and (self.settings.keep_optimizer or account is not None or remedy_out
                                       or residual is not None):
            self.store.save(round_idx + 1, {"optimizer": result.optimizer_state,
                                            "privacy": account.to_dict() if account is not None else None,
                                            "control": remedy_out.get("control"), "residual": residual})
        arrays = update | ({"control_delta": remedy_out["control_delta"]} if remedy_out else {})
        return Reply(self.silo, arrays=arrays, config=config)

    def _compressed(self, state: dict, global_state: dict, saved: dict) -> tuple[dict, dict | None]:
        """The reply's update arrays under fl.compression (algorithms/feddm/compression.py) and the residual the
        silo keeps for error feedback (None: nothing to keep). Error feedback is off under client-level DP, whose
        clipping bounds one round's update alone."""
        kind = self.cfg.fl.compression
        if kind == "none":
            return {"local": state}, None
        feedback = self.cfg.privacy.mode != "client-dp"
        if feedback and self.store is None:
            raise SiloDataError(f"silo {self.silo}: fl.compression={kind} keeps an error-feedback residual and "
                                "needs a state directory")
        return compress(state, global_state, kind, saved.get("residual"), feedback)

    def _remedy(self, request: Request, saved: dict) -> LocalRemedy | None:
        """FedProx's proximal term or SCAFFOLD's correction for this fit (algorithms/feddm/remedies.py), or None.
        SCAFFOLD's client variate c_i is the silo's own state, kept in its store from the last round it took part
        in."""
        fl = self.cfg.fl
        if fl.strategy == "fedprox":
            return Proximal(self.local.model, request.arrays["global"], fl.prox_mu)
        if fl.strategy != "scaffold":
            return None
        if self.store is None:
            raise SiloDataError(f"silo {self.silo}: SCAFFOLD needs a state directory for its control variate")
        return ScaffoldCorrection(self.local.model, request.arrays["global"],
                                  self.settings.lr_at(int(request.config["round"])),
                                  request.arrays["control"], saved.get("control"))

    def _private_fit(self, saved: dict, round_idx: int, known_steps: int) -> DPSGD | None:
        """DP-SGD for this fit, or None without it. The account (sigma, q, steps so far) is the silo's own, kept in
        its store: opened on its first fit, for the rounds it will take part in. `known_steps`: the steps the
        coordinator's ledger holds for this silo (`checked_secret` refuses if the store has fewer)."""
        privacy = self.cfg.privacy
        if privacy.mode != "dp-sgd":
            return None
        if self.store is None:
            raise SiloDataError(f"silo {self.silo}: DP-SGD needs a state directory for its privacy account")
        q, per_epoch = poisson_plan(len(self.data), self.settings.batch_size)
        account = Account.from_dict(saved["privacy"]) if saved.get("privacy") else None
        secret = checked_secret(self.silo, self.store.path, account, known_steps, round_idx)
        if account is None:
            planned = planned_rounds(self.cfg, self.silo) * self.settings.epochs * per_epoch
            account = open_account(privacy, q, planned, len(self.data))
        return DPSGD(account, privacy.max_grad_norm, privacy.noise_multiplicity,
                     secret_generator(secret, "dp-fit", round_idx))

    def _evaluate(self, request: Request) -> Reply:
        if self.cfg.privacy.mode != "none":
            raise SiloDataError(f"silo {self.silo} answers no loss queries on its data under privacy.mode="
                                f"{self.cfg.privacy.mode}: the answer would not be covered by its privacy account")
        self.local.model.load_state_dict(request.arrays["global"])
        loss = evaluation_loss(self.local.model, self.local.scheduler, self.data,
                               max_samples=int(request.config["max_samples"]), seed=self.cfg.train.seed,
                               key=("client", self.silo), device=self.local.device)
        return Reply(self.silo, config={"loss": loss})
