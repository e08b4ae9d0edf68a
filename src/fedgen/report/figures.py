"""The report's plots, as PNG bytes, from plain data: lines against rounds or compute, the partition heatmap,
ROC curves. matplotlib's object API (no pyplot state), the Agg backend."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402 - after the backend is chosen

Lines = dict[str, tuple[list[float], list[float]]]  # label -> (xs, ys)


LEGEND_MAX = 20  # series named in a legend
TICKS_MAX = 40  # silos named on a heatmap's axis


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def lines(series: Lines, xlabel: str, ylabel: str, title: str, *, logy: bool = False,
          size: tuple[float, float] = (6.4, 3.6)) -> bytes:
    """One line per label (markers where there are few points); non-finite values are left out."""
    fig = Figure(figsize=size, dpi=100)
    ax = fig.subplots()
    for label, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if isinstance(y, int | float) and math.isfinite(y)]
        if not pts:
            continue
        px, py = zip(*pts, strict=True)
        ax.plot(px, py, marker="o" if len(pts) < 40 else None, ms=3.5, lw=1.4, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    if 1 < len(series) <= LEGEND_MAX:  # hundreds of silos' lines: no legend (it would not fit), the lines alone
        ax.legend(fontsize=7, loc="best", ncol=2 if len(series) > 6 else 1)
    fig.tight_layout()
    return png(fig)


def heatmap(counts: list[list[int]], rows: list[str], columns: list[str], title: str) -> bytes:
    """A clients x classes count matrix, each cell annotated (where there is room)."""
    import numpy as np

    data = np.asarray(counts, dtype=float)
    fig = Figure(figsize=(min(12.0, 1.6 + 0.55 * len(columns)), min(9.0, 1.3 + 0.42 * len(rows))), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(data, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(columns)), [c[:10] for c in columns], rotation=45 if len(columns) > 10 else 0,
                  fontsize=8)
    if len(rows) <= TICKS_MAX:  # a row label per silo while they can be read
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("class")
    ax.set_ylabel("silo")
    if data.size <= 400:
        top = data.max() if data.size else 0
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7,
                    color="white" if top and v > 0.6 * top else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return png(fig)


def roc(curves: dict[str, tuple[list[float], list[float]]], title: str) -> bytes:
    """ROC curves (label -> (FPR, TPR)) on linear axes with the diagonal of a guess, and on log-log axes (the low
    false-positive rates where a membership attack matters)."""
    fig = Figure(figsize=(9.6, 3.9), dpi=100)
    lin, log = fig.subplots(1, 2)
    for label, (fpr, tpr) in curves.items():
        lin.plot(fpr, tpr, lw=1.4, label=label)
        log.plot([max(f, 1e-4) for f in fpr], [max(t, 1e-4) for t in tpr], lw=1.4, label=label)
    for ax, scale in ((lin, "linear"), (log, "log")):
        ax.plot([1e-4, 1], [1e-4, 1], ls="--", color="grey", lw=1, label="chance")
        ax.set_xscale(scale)
        ax.set_yscale(scale)
        ax.set_xlabel("false positive rate (non-members called members)")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
    lin.set_title(title, fontsize=10)
    log.set_title("the same, log-log (low FPR)", fontsize=10)
    lin.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return png(fig)
