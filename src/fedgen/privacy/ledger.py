"""The run's privacy ledger: what the coordinator knows of every party's account, logged with each round.

- dp-sgd: each silo keeps its own account (it adds the noise) and reports it with every update; the run's
  record-level epsilon is the largest silo epsilon (the silos hold disjoint records and FedAvg is post-processing).
- dp-release (DP-MERF): each silo noises its one release (the Gaussian mechanism, sensitivity 1) and reports that
  account; the run's record-level epsilon is again the largest silo epsilon.
- client-dp: the coordinator adds the noise, so it keeps the account, in the run directory.
- none: no formal guarantee, said so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedgen.config import Config
from fedgen.core.errors import FedgenError
from fedgen.privacy.accountant import ACCOUNTANT_NAMES, Account, open_account

NO_GUARANTEE = "none: no formal guarantee (FedAvg alone is not privacy)"
PGA_NOISE = "PGA loss noise: heuristic, no formal guarantee"


def report_values(report: dict) -> dict:
    """An account's report as flat reply values (`dp_epsilon`, ...): Flower's ConfigRecord holds no None/dicts."""
    return {f"dp_{k}": v for k, v in report.items() if v is not None}


def account_report(config: dict) -> dict:
    """The `dp_*` values of a reply's config, back as an account report."""
    return {k[3:]: v for k, v in config.items() if k.startswith("dp_")}


class LedgerError(FedgenError, RuntimeError):
    """A party's privacy report went backwards (fewer steps or a smaller epsilon than it reported before): its
    state was rolled back or replaced, and the run's epsilon would be under-reported. The round is aborted."""


class RunPrivacy:
    def __init__(self, cfg: Config, run_path: Path | None, num_params: int):
        """`run_path`: where the coordinator keeps its client-level account (needed for client-dp only)."""
        self.cfg, self.privacy = cfg, cfg.privacy
        self.mode = cfg.privacy.mode
        self.reports: dict[str, dict] = {}
        self.last_epsilon = 0.0
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
                self.last_epsilon = max(self.last_epsilon, float(rec["privacy"].get("epsilon", 0.0)))
        if self.server is not None:
            self.server.steps = rounds_done

    def known_steps(self, party: int) -> int:
        """The DP steps the ledger holds for `party` (sent with each request: a party with fewer refuses)."""
        return int(self.reports.get(str(party), {}).get("steps", 0))

    def observe(self, party: int, config: dict, round_idx: int | None = None) -> None:
        """Take a party's report; one with fewer steps or a smaller epsilon than its last is a LedgerError."""
        report = account_report(config)
        if not report:
            return
        before = self.reports.get(str(party))
        if before is not None and (report["steps"] < before["steps"] or report["epsilon"] < before["epsilon"]):
            at = f"round {round_idx + 1} aborted: " if round_idx is not None else ""
            raise LedgerError(
                f"{at}silo {party} reports {report['steps']} DP steps (epsilon {report['epsilon']:.4g}), fewer than "
                f"the {before['steps']} steps (epsilon {before['epsilon']:.4g}) it reported before: its privacy "
                "state was rolled back or replaced, and the run's epsilon would be under-reported. Nothing was "
                "written for this round; restore the silo's state folder and rerun.")
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
            bound = {"sensitivity": "1 (every record's feature row has norm 1), one release per silo"} \
                if self.mode == "dp-release" else {"max_grad_norm": self.privacy.max_grad_norm}
            out |= {"unit": "record", "epsilon": max(eps, default=0.0), **bound,
                    "parties": dict(sorted(self.reports.items(), key=lambda kv: int(kv[0])))}
        if out["epsilon"] < self.last_epsilon:  # the parties' checks make this unreachable; it guards them
            raise LedgerError(f"the run's epsilon fell from {self.last_epsilon:.4g} to {out['epsilon']:.4g} after "
                              f"round {rounds_done}: refusing to record an under-reported ledger")
        self.last_epsilon = out["epsilon"]
        if pga_noise:
            out["pga_loss_noise"] = PGA_NOISE
        return out


def summary(entry: dict | str) -> str:
    """One line for the console: epsilon with its delta and unit, or the absence of a guarantee."""
    if not isinstance(entry, dict):
        return f"privacy {entry}"
    eps = f"{entry['epsilon']:.3g}" if math.isfinite(entry["epsilon"]) else "inf"
    return f"{entry['unit']}-level ε={eps} (δ={entry['delta']:g})"
