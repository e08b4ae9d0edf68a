"""The coordinating side of every algorithm behind one door: what the round loop builds by `cfg.algorithm`."""

from __future__ import annotations

from fedgen.algorithms.feddm.server import FedDM
from fedgen.algorithms.merf.coordinator import MERF
from fedgen.algorithms.pga.coordinator import PGA
from fedgen.federation.algorithm import Algorithm, RoundContext


def make_algorithm(ctx: RoundContext) -> Algorithm:
    """The coordinating side of `ctx.cfg.algorithm` (a federation.algorithm.MakeAlgorithm)."""
    return {"pga": PGA, "merf": MERF}.get(ctx.cfg.algorithm, FedDM)(ctx)
