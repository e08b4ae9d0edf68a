"""A DP-MERF silo: it answers one `merf-release` request per run with its class-conditional feature sum
(algorithms/merf/embedding.py), noised with the Gaussian mechanism where `privacy.mode = "dp-release"`.

The release is made once and kept in the silo's state folder with its privacy account (one step of the Gaussian
mechanism, sample rate 1): asked again (a resumed or extended run, another process on a SuperNode), the silo sends
the same bits and reports the same account, so epsilon is spent once. A silo whose ledger entry says it released
before but whose folder has lost the release refuses: a new draw would be a second, unaccounted release.
"""

from __future__ import annotations

import torch

from fedgen.algorithms.merf.embedding import FourierFeatures, class_sums
from fedgen.config import Config
from fedgen.core.errors import SiloDataError, SiloStateError
from fedgen.core.records import Reply, Request
from fedgen.data.silos import SiloData
from fedgen.federation.silo_state import SiloStateStore
from fedgen.federation.silos import describe_silo
from fedgen.privacy.accountant import Account, open_account
from fedgen.privacy.ledger import report_values
from fedgen.privacy.secret import secret_generator
from fedgen.privacy.silo_account import checked_secret

RELEASE_FILE = "merf_release.pt"


class MERFSilo:
    """Silo `silo` of a DP-MERF run (a `core.records.Worker`)."""

    def __init__(self, cfg: Config, silo: int, data: SiloData, classes: list[str], device: torch.device,
                 store: SiloStateStore | None = None):
        self.cfg, self.silo, self.data, self.classes, self.device, self.store = cfg, silo, data, classes, device, store

    @property
    def private(self) -> bool:
        return self.cfg.privacy.mode == "dp-release"

    def steps(self, request: Request) -> int:
        return 0

    def handle(self, request: Request) -> Reply:
        if self.cfg.train.cpu_threads:
            torch.set_num_threads(self.cfg.train.cpu_threads)
        if request.kind == "describe":
            return describe_silo(self.silo, self.data, self.classes, request)
        if request.kind == "merf-release":
            return self._release(int(request.config.get("privacy_steps", 0)))
        raise ValueError(f"silo {self.silo}: unknown request kind {request.kind!r}")

    def _sums(self) -> torch.Tensor:
        m = self.cfg.merf
        features = FourierFeatures(tuple(self.data.images.shape[1:]), m.features, m.bandwidths, self.cfg.train.seed,
                                   self.device)
        return class_sums(features, self.data.images, self.data.labels, len(self.classes))

    def _release(self, known_steps: int) -> Reply:
        if not self.private:  # no formal guarantee: the exact sums
            return Reply(self.silo, arrays={"release": {"sums": self._sums()}})
        if self.store is None:
            raise SiloDataError(f"silo {self.silo}: a DP release needs a state directory for its privacy account")
        path = self.store.path / RELEASE_FILE
        if path.exists():
            kept = torch.load(path, weights_only=False)
            sums, account = kept["sums"], Account.from_dict(kept["account"])
            checked_secret(self.silo, self.store.path, account, known_steps, 0)
        else:
            if known_steps > 0:
                raise SiloStateError(
                    f"silo {self.silo}: the run's privacy ledger says this silo released its embedding, but its "
                    f"state folder {self.store.path} holds no release ({RELEASE_FILE}); a new draw would be a "
                    "second, unaccounted release: restore that folder (it must be kept for the life of the run)")
            secret = checked_secret(self.silo, self.store.path, None, known_steps, 0)
            account = open_account(self.cfg.privacy, 1.0, 1, len(self.data))
            exact = self._sums()
            noise = torch.randn(exact.shape, generator=secret_generator(secret, "merf-release"), dtype=torch.float64)
            sums = exact + account.noise_multiplier * noise  # sensitivity 1 (each record's row has norm 1)
            account.steps = 1
            self.store.path.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"sums": sums, "account": account.to_dict()}, tmp)
            tmp.replace(path)
        return Reply(self.silo, arrays={"release": {"sums": sums}}, config=report_values(account.report()))
