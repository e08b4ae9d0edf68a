"""The run's privacy ledger: what the coordinator knows of every party's account, logged with each round.

- dp-sgd: each silo keeps its own account (it adds the noise) and reports it with every update; the run's
  record-level epsilon is the largest silo epsilon (the silos hold disjoint records and FedAvg is post-processing).
- client-dp: the coordinator adds the noise, so it keeps the account, in the run directory.
- none: no formal guarantee, said so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedgen.config import Config
from fedgen.privacy.accountant import ACCOUNTANT_NAMES, Account, open_account

NO_GUARANTEE = "none: no formal guarantee (FedAvg alone is not privacy)"
PGA_NOISE = "PGA loss noise: heuristic, no formal guarantee"


def party_reports(config: dict) -> dict:
    """The `dp_*` values of a reply's config, back as an account report."""
    return {k[3:]: v for k, v in config.items() if k.startswith("dp_")}


class RunPrivacy:
    def __init__(self, cfg: Config, run_path: Path | None, num_params: int):
        """`run_path`: where the coordinator keeps its client-level account (needed for client-dp only)."""
        self.cfg, self.privacy = cfg, cfg.privacy
        self.mode = cfg.privacy.mode
        self.reports: dict[str, dict] = {}
        self.server: Account | None = None
        self.num_params = num_params
        if self.mode == "client-dp":
            self.server = self._server_account(Path(run_path) / "privacy" / "client_dp.json")

    def _server_account(self, path: Path) -> Account:
        """Opened once per run (sigma solved for all R rounds at rate K/N) and kept: an extension keeps sigma."""
        if path.exists():
            return Account.from_dict(json.loads(path.read_text()))
        fl = self.cfg.fl
        account = open_account(self.privacy, fl.k / fl.clients, fl.rounds, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(account.to_dict(), indent=1))
        return account

    def restore(self, records: list[dict], rounds_done: int) -> None:
        for rec in records:
            if rec.get("event") == "round" and isinstance(rec.get("privacy"), dict):
                self.reports.update(rec["privacy"].get("parties", {}))
        if self.server is not None:
            self.server.steps = rounds_done

    def observe(self, party: int, config: dict) -> None:
        report = party_reports(config)
        if report:
            self.reports[str(party)] = report

    def record(self, rounds_done: int) -> dict | str:
        """The round record's `privacy` entry after `rounds_done` rounds."""
        pga_noise = self.cfg.algorithm == "pga" and self.cfg.pga.noise_ratio > 0
        if self.mode == "none":
            return PGA_NOISE if pga_noise else NO_GUARANTEE
        out: dict = {"mode": self.mode, "delta": self.privacy.delta, "accountant": ACCOUNTANT_NAMES[
            self.privacy.accountant], "target_epsilon": self.privacy.target_epsilon}
        if self.server is not None:
            self.server.steps = rounds_done
            out |= {"unit": "client", "epsilon": self.server.epsilon(), "server": self.server.report()}
        else:
            eps = [r["epsilon"] for r in self.reports.values()]
            out |= {"unit": "record", "epsilon": max(eps) if eps else 0.0,
                    "max_grad_norm": self.privacy.max_grad_norm, "parties": dict(sorted(self.reports.items(),
                                                                                     key=lambda kv: int(kv[0])))}
        if pga_noise:
            out["pga_loss_noise"] = PGA_NOISE
        return out


def summary(entry: dict | str) -> str:
    """One line for the console: epsilon with its delta and unit, or the absence of a guarantee."""
    if not isinstance(entry, dict):
        return f"privacy {entry}"
    eps = f"{entry['epsilon']:.3g}" if math.isfinite(entry["epsilon"]) else "inf"
    return f"{entry['unit']}-level ε={eps} (δ={entry['delta']:g})"
