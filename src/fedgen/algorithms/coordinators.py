"""The coordinating side of both algorithms behind one door: what the round loop builds by `cfg.algorithm`."""

from __future__ import annotations

from fedgen.algorithms.feddm.server import FedDM
from fedgen.algorithms.pga.coordinator import PGA
from fedgen.federation.algorithm import Algorithm, RoundContext


def make_algorithm(ctx: RoundContext) -> Algorithm:
    """The coordinating side of `ctx.cfg.algorithm` (a federation.algorithm.MakeAlgorithm)."""
    return PGA(ctx) if ctx.cfg.algorithm == "pga" else FedDM(ctx)
