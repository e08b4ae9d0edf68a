"""A PGA party: it keeps its real data and its own discriminator (of its own architecture) and answers one
request per generator step (docs/DESIGN.md, PGA):

1. one discriminator step (BCE, or hinge with `pga.adversarial`; Adam; with `pga.loss = "acgan"` also the
   auxiliary classifier's cross-entropy on the real batch) on (a real batch of its own, fake batch 1); d_i = its
   loss on fake batch 1;
2. g_i = BCE(D_i(fake batch 2), 1) (hinge: -D_i(fake batch 2); plus, with acgan, the classifier's cross-entropy on
   the labels of fake batch 2) with the updated discriminator, and the noised g_i + N(0, (ratio * d_i)^2);
3. where asked (the step's representative, or every party in `mean` mode), dg_i/d(fake batch 2).

It never receives the generator's weights and never sends its discriminator's. The discriminator and its
optimizer are persistent party state: kept in memory, written after every step where a runtime may run the next
step in another process (Flower), and committed per round in the party's store so a resumed run starts from the
last committed round.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedgen.config import Config
from fedgen.core.errors import SiloDataError, SiloStateError
from fedgen.core.records import Reply, Request
from fedgen.core.seeding import derive_seed, generator
from fedgen.data.silos import SiloData
from fedgen.federation.silo_state import SiloStateStore
from fedgen.federation.silos import describe_silo
from fedgen.nn.diffaugment import diff_augment
from fedgen.nn.gan import build_discriminator
from fedgen.privacy.accountant import Account, open_account
from fedgen.privacy.dpsgd import PrivateSteps, poisson_batch, poisson_plan
from fedgen.privacy.ledger import report_values
from fedgen.privacy.secret import secret_generator
from fedgen.privacy.silo_account import checked_secret

BETAS = (0.5, 0.999)  # DCGAN's Adam


def discriminator_kind(cfg: Config, silo: int) -> str:
    kinds = cfg.pga.discriminators
    return kinds[silo] if len(kinds) > 1 else kinds[0]


class PGASilo:
    """Party `silo` of a PGA run (a `core.records.Worker`): its data, its own discriminator and that
    discriminator's persistent state."""

    def __init__(self, cfg: Config, silo: int, data: SiloData, classes: list[str], device: torch.device,
                 store: SiloStateStore | None = None, persist_each_step: bool = False):
        self.cfg, self.silo, self.data, self.classes, self.device = cfg, silo, data, classes, device
        self.store = store
        self.persist_each_step = persist_each_step
        self.kind = discriminator_kind(cfg, silo)
        self.image_shape = tuple(data.images.shape[1:])
        self.position = -1  # generator steps the discriminator in memory has seen (-1: none loaded)
        self.on_step = None
        self._fresh()

    @property
    def private(self) -> bool:
        return self.cfg.privacy.mode == "dp-sgd"

    @property
    def auxiliary(self) -> bool:
        return self.cfg.pga.loss == "acgan"

    def _loss(self, x: torch.Tensor, labels: torch.Tensor, real: bool | torch.Tensor, classify: bool | torch.Tensor,
              augment: torch.Generator | None, reduction: str = "mean", generator_side: bool = False) -> torch.Tensor:
        """The discriminator's loss on `x` labelled real (1) or fake (0), or with `generator_side` the generator's
        loss g_i on fakes, plus, with the auxiliary classifier (pga.loss = "acgan") where `classify`, its
        cross-entropy against `labels`. `real` and `classify` are one value for the batch or one per row; per row
        with reduction="none". With pga.diffaugment, `x` is first augmented with draws from `augment`.
        The real-vs-fake term (pga.adversarial): bce, where the generator's non-saturating loss is the
        discriminator's loss with the label "real"; or hinge, relu(1 - D) on real, relu(1 + D) on fake, and -D
        for the generator."""
        if self.cfg.pga.diffaugment:
            x = diff_augment(x, augment)
        out = self.d(x, labels)
        logit = out[:, 0] if self.auxiliary else out
        if self.cfg.pga.adversarial == "hinge":
            is_real = torch.as_tensor(real, device=self.device).expand(len(x))
            rows = -logit if generator_side else torch.where(is_real, (1 - logit).relu(), (1 + logit).relu())
            loss = rows.mean() if reduction == "mean" else rows
        else:
            target = torch.as_tensor(real, dtype=logit.dtype, device=self.device).expand(len(x))
            loss = nn.functional.binary_cross_entropy_with_logits(logit, target, reduction=reduction)
        if self.auxiliary:
            ce = nn.functional.cross_entropy(out[:, 1:], labels, reduction="none")
            ce = torch.where(torch.as_tensor(classify, device=self.device), ce, torch.zeros_like(ce))
            loss = loss + (ce.mean() if reduction == "mean" else ce)
        return loss

    def _fresh(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.train.seed, "pga-init-d", self.silo))
            self.d = build_discriminator(self.kind, self.image_shape, len(self.classes), self.private,
                                         auxiliary=self.auxiliary,
                                         spectral_norm=self.cfg.pga.spectral_norm).to(self.device)
        self.opt = torch.optim.Adam(self.d.parameters(), lr=self.cfg.pga.lr_discriminator, betas=BETAS)
        self.dp, self.account, self.secret = None, None, None
        if self.private:  # DP-SGD on the discriminator; the account and the noise generator are set per step
            if self.store is None:
                raise SiloDataError(f"party {self.silo}: DP-SGD needs a state directory for its privacy account")
            self.dp = PrivateSteps(self.d, self.opt, noise_multiplier=0.0, max_grad_norm=self.cfg.privacy.max_grad_norm,
                                   expected_batch_size=self.cfg.train.batch_size, noise_generator=torch.Generator())

    def steps(self, request: Request) -> int:
        """A generator step is one discriminator step: no per-step progress bar of its own."""
        return 0

    def handle(self, request: Request) -> Reply:
        if self.cfg.train.cpu_threads:
            torch.set_num_threads(self.cfg.train.cpu_threads)
        if request.kind == "describe":
            return describe_silo(self.silo, self.data, self.classes, request)
        if request.kind == "pga-step":
            return self._step(request)
        raise ValueError(f"party {self.silo}: unknown request kind {request.kind!r}")

    # -- persistent state
    def _current_file(self) -> Path | None:
        return self.store.path / "current.pt" if self.store is not None else None

    def _state(self) -> dict:
        return {"position": self.position, "d": self.d.state_dict(), "opt": self.opt.state_dict(),
                "privacy": self.account.to_dict() if self.account is not None else None}

    def _load(self, state: dict | None, position: int, known_steps: int) -> None:
        self._fresh()
        if state is not None:
            self.d.load_state_dict(state["d"])
            self.opt.load_state_dict(state["opt"])
        if self.private:
            account = Account.from_dict(state["privacy"]) if state is not None and state.get("privacy") else None
            self.secret = checked_secret(self.silo, self.store.path, account, known_steps,
                                         position // self.cfg.pga.steps_per_round)
            if account is None:  # every party takes one DP step per generator step, for the whole run
                q = poisson_plan(len(self.data), self.cfg.train.batch_size)[0]
                planned = self.cfg.fl.rounds * self.cfg.pga.steps_per_round
                account = open_account(self.cfg.privacy, q, planned, len(self.data))
            self.account = account
        self.position = position

    def _bring_to(self, round_idx: int, step: int, known_steps: int) -> None:
        """Make the discriminator the one that has seen exactly the generator steps before (round, step)."""
        per_round = self.cfg.pga.steps_per_round
        want = round_idx * per_round + step
        if self.position == want:
            return
        current = self._current_file()
        if current is not None and current.exists():
            state = torch.load(current, weights_only=False)
            if state["position"] == want:
                self._load(state, want, known_steps)
                return
        where = f"its state folder {self.store.path}" if self.store is not None else "it has no state folder"
        if step != 0:
            raise SiloStateError(f"party {self.silo} lost its discriminator's state mid-round (has step "
                                 f"{self.position}, asked for {want}; {where})")
        committed = self.store.load(round_idx) if self.store is not None else None
        if committed is None and round_idx > 0:
            raise SiloStateError(f"party {self.silo}: {where} holds no discriminator committed for round "
                                 f"{round_idx}; restore it (it must be kept for the life of the run)")
        self._load(committed, want, known_steps)

    # -- one generator step
    def _step(self, request: Request) -> Reply:
        cfg, c = self.cfg, request.config
        round_idx, step = int(c["round"]), int(c["step"])
        self._bring_to(round_idx, step, int(c.get("privacy_steps", 0)))
        batch = request.arrays["batch"]
        fake1, labels1 = batch["fake1"].to(self.device), batch["labels1"].to(self.device)
        fake2, labels2 = batch["fake2"].to(self.device), batch["labels2"].to(self.device)
        self.d.train()
        # the augmentation's draws are public randomness (a function of the run seed), apart from the DP noise
        augment = generator(cfg.train.seed, "pga-augment", round_idx, step, self.silo) if cfg.pga.diffaugment \
            else None
        if self.private:
            gen, d_i = self._private_d_step(round_idx, step, fake1, labels1, augment)
            real_loss = None
        else:
            gen = generator(cfg.train.seed, "pga-party", round_idx, step, self.silo)
            idx = torch.randint(len(self.data), (len(fake1),), generator=gen)
            real, real_labels = self.data.images[idx].to(self.device), self.data.labels[idx].to(self.device)
            real_loss = self._loss(real, real_labels, real=True, classify=True, augment=augment)
            fake_loss = self._loss(fake1, labels1, real=False, classify=False, augment=augment)
            self.opt.zero_grad(set_to_none=True)
            (real_loss + fake_loss).backward()
            self.opt.step()
            d_i = float(fake_loss.detach())
        fake2 = fake2.detach().requires_grad_(bool(c.get("want_grad")))
        if self.dp is not None:  # the feedback is post-processing of the DP discriminator: no per-sample work
            self.dp.module.disable_hooks()
        try:
            g = self._loss(fake2, labels2, real=True, classify=True, augment=augment, generator_side=True)
            arrays = {}
            if c.get("want_grad"):
                (grad,) = torch.autograd.grad(g, fake2)
                arrays["grad"] = {"fake2": grad.detach().cpu()}
        finally:
            if self.dp is not None:
                self.dp.module.enable_hooks()
        noise = float(torch.randn((), generator=gen)) * cfg.pga.noise_ratio * d_i
        self.position += 1
        g_value = float(g.detach())
        config = {"d": d_i, "g": g_value, "g_noised": g_value + noise}
        if real_loss is not None:  # a DP party does not report a loss on its real data
            config["real_loss"] = float(real_loss.detach())
        if self.account is not None and step + 1 == cfg.pga.steps_per_round:
            config |= report_values(self.account.report())
        self._persist(round_idx, step)
        return Reply(self.silo, arrays=arrays, config=config)

    def _private_d_step(self, round_idx: int, step: int, fake1: torch.Tensor, labels1: torch.Tensor,
                        augment: torch.Generator | None):
        """One DP-SGD step of the discriminator: a Poisson sample of the party's real images and fake batch 1 in
        one batch, every row's gradient clipped, noise from the party's secret generator. Returns that generator
        (it also draws the PGA loss noise) and d_i, the loss on the fakes."""
        gen = secret_generator(self.secret, "pga-dp", round_idx, step)
        idx = poisson_batch(len(self.data), self.account.sample_rate, gen)
        x = torch.cat([self.data.images[idx].to(self.device), fake1])
        labels = torch.cat([self.data.labels[idx].to(self.device), labels1])
        real = torch.arange(len(x), device=self.device) < len(idx)
        # the classifier learns from the real rows only; each row's loss (BCE, plus CE with acgan) is clipped whole
        rows = self._loss(x, labels, real=real, classify=real, augment=augment, reduction="none")
        self.dp.use(self.account, gen)
        self.dp.step(rows, len(rows))  # the account's steps advance with it (the optimiser's step hook)
        return gen, float(rows[len(idx):].mean().detach())

    def _persist(self, round_idx: int, step: int) -> None:
        if self.store is None:
            return
        if self.persist_each_step:
            self.store.path.mkdir(parents=True, exist_ok=True)
            tmp = self.store.path / "current.tmp"
            torch.save(self._state(), tmp)
            tmp.replace(self.store.path / "current.pt")
        if step + 1 == self.cfg.pga.steps_per_round:  # the round's last step: commit
            self.store.save(round_idx + 1, self._state())
