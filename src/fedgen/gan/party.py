"""A PGA party: it keeps its real data and its own discriminator (of its own architecture) and answers one
request per generator step (docs/DESIGN.md, PGA):

1. one discriminator step (BCE, Adam) on (a real batch of its own, fake batch 1); d_i = its loss on fake batch 1;
2. g_i = BCE(D_i(fake batch 2), 1) with the updated discriminator, and the noised g_i + N(0, (ratio * d_i)^2);
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
from fedgen.fl.client import ClientData
from fedgen.fl.protocol import Reply, Request
from fedgen.fl.worker import SiloDataError, SiloStateStore, describe_silo
from fedgen.models.gan import build_discriminator
from fedgen.seeding import derive_seed, generator

BETAS = (0.5, 0.999)  # DCGAN's Adam


def discriminator_kind(cfg: Config, silo: int) -> str:
    kinds = cfg.pga.discriminators
    return kinds[silo] if len(kinds) > 1 else kinds[0]


class PGAParty:
    def __init__(self, cfg: Config, silo: int, data: ClientData, classes: list[str], device: torch.device,
                 store: SiloStateStore | None = None, persist_each_step: bool = False):
        self.cfg, self.silo, self.data, self.classes, self.device = cfg, silo, data, classes, device
        self.store = store
        self.persist_each_step = persist_each_step
        self.kind = discriminator_kind(cfg, silo)
        self.image_shape = tuple(data.images.shape[1:])
        self.position = -1  # generator steps the discriminator in memory has seen (-1: none loaded)
        self.on_step = None
        self._fresh()

    def _fresh(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.train.seed, "pga-init-d", self.silo))
            self.d = build_discriminator(self.kind, self.image_shape, len(self.classes)).to(self.device)
        self.opt = torch.optim.Adam(self.d.parameters(), lr=self.cfg.pga.lr_discriminator, betas=BETAS)

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
        return {"position": self.position, "d": self.d.state_dict(), "opt": self.opt.state_dict()}

    def _load(self, state: dict | None, position: int) -> None:
        self._fresh()
        if state is not None:
            self.d.load_state_dict(state["d"])
            self.opt.load_state_dict(state["opt"])
        self.position = position

    def _bring_to(self, round_idx: int, step: int) -> None:
        """Make the discriminator the one that has seen exactly the generator steps before (round, step)."""
        per_round = self.cfg.pga.steps_per_round
        want = round_idx * per_round + step
        if self.position == want:
            return
        current = self._current_file()
        if current is not None and current.exists():
            state = torch.load(current, weights_only=False)
            if state["position"] == want:
                self._load(state, want)
                return
        if step != 0:
            raise SiloDataError(f"party {self.silo} lost its discriminator's state mid-round (has step "
                                f"{self.position}, asked for {want})")
        committed = self.store.load(round_idx) if self.store is not None else None
        if committed is None and round_idx > 0:
            raise SiloDataError(f"party {self.silo} has no discriminator committed for round {round_idx}")
        self._load(committed, want)

    # -- one generator step
    def _step(self, request: Request) -> Reply:
        cfg, c = self.cfg, request.config
        round_idx, step = int(c["round"]), int(c["step"])
        self._bring_to(round_idx, step)
        batch = request.arrays["batch"]
        fake1, labels1 = batch["fake1"].to(self.device), batch["labels1"].to(self.device)
        fake2, labels2 = batch["fake2"].to(self.device), batch["labels2"].to(self.device)
        gen = generator(cfg.train.seed, "pga-party", round_idx, step, self.silo)
        idx = torch.randint(len(self.data), (len(fake1),), generator=gen)
        real, real_labels = self.data.images[idx].to(self.device), self.data.labels[idx].to(self.device)
        bce = nn.functional.binary_cross_entropy_with_logits
        self.d.train()
        real_loss = bce(self.d(real, real_labels), torch.ones(len(real), device=self.device))
        fake_loss = bce(self.d(fake1, labels1), torch.zeros(len(fake1), device=self.device))
        self.opt.zero_grad(set_to_none=True)
        (real_loss + fake_loss).backward()
        self.opt.step()
        d_i = float(fake_loss.detach())
        fake2 = fake2.detach().requires_grad_(bool(c.get("want_grad")))
        g = bce(self.d(fake2, labels2), torch.ones(len(fake2), device=self.device))
        noise = float(torch.randn((), generator=gen)) * cfg.pga.noise_ratio * d_i
        arrays = {}
        if c.get("want_grad"):
            (grad,) = torch.autograd.grad(g, fake2)
            arrays["grad"] = {"fake2": grad.detach().cpu()}
        self.position += 1
        self._persist(round_idx, step)
        g_value = float(g.detach())
        config = {"d": d_i, "g": g_value, "g_noised": g_value + noise, "real_loss": float(real_loss.detach())}
        return Reply(self.silo, arrays=arrays, config=config)

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
