"""Optional TensorBoard logging (`log.tensorboard = true`): the same per-round scalars metrics.jsonl holds, and
the sample grids, in RUN/tensorboard, through `torch.utils.tensorboard` (the `tensorboard` package, an extra:
`pip install 'fedgen[tensorboard]'`). metrics.jsonl stays the record; this is a view of it where ML users look.

Tags: a record's number `global_test_loss` -> `round/global_test_loss`; a per-silo mapping `global_client_loss`
{"0": ..} -> `round/global_client_loss/silo_0`; the ledger -> `privacy/epsilon` and `privacy/epsilon/silo_0`;
an evaluation during training -> `evaluate/fid_domain_test`; a grid -> the image `samples`. The step is the
round."""

from __future__ import annotations

import math
from pathlib import Path

from fedgen.core.errors import UsageError


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def scalars(record: dict, prefix: str) -> dict[str, float]:
    """The tags and values of one metrics record (numbers, per-silo mappings of numbers, the ledger's ε)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("round", "event", "time"):
            continue
        if key == "privacy" and isinstance(value, dict):
            if (eps := _number(value.get("epsilon"))) is not None:
                out["privacy/epsilon"] = eps
            for party, rep in (value.get("parties") or {}).items():
                if (eps := _number(rep.get("epsilon"))) is not None:
                    out[f"privacy/epsilon/silo_{party}"] = eps
        elif isinstance(value, dict):
            for party, v in value.items():
                if (x := _number(v)) is not None:
                    out[f"{prefix}/{key}/silo_{party}"] = x
        elif (x := _number(value)) is not None:
            out[f"{prefix}/{key}"] = x
    return out


class Tracker:
    """Writes to TensorBoard when `enabled`; does nothing otherwise. Fails at construction, before training, where
    the tensorboard package is missing."""

    def __init__(self, enabled: bool, log_dir: Path):
        self.writer = None
        self.log_dir = log_dir
        self._open = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("log.tensorboard = true needs the tensorboard package: pip install 'fedgen[tensorboard]' "
                             "(or set log.tensorboard=false)") from None
        self._open = SummaryWriter  # the folder is made with the first value, not before training starts

    def _writer(self):
        if self.writer is None and self._open is not None:
            self.writer = self._open(log_dir=str(self.log_dir))
        return self.writer

    def record(self, record: dict, prefix: str = "round") -> None:
        if (writer := self._writer()) is None:
            return
        step = int(record.get("round", 0))
        for tag, value in scalars(record, prefix).items():
            writer.add_scalar(tag, value, step)
        writer.flush()

    def image(self, tag: str, png: Path, step: int) -> None:
        if (writer := self._writer()) is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(png) as img:
            writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
        writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
