"""Feature extractors for FID/KID/IS/precision-recall, each fed images in the range and dtype it expects.

- Domain: an EvalCNN trained on the real training split of the dataset, cached on disk per dataset with its
  real test accuracy; takes float images in [-1, 1]. Metrics from it are named `*_domain_*`.
- Inception: the standard FID InceptionV3 (torch-fidelity's port of the TF graph) from a local weights file,
  checked by SHA-256; takes uint8 RGB in [0, 255]. Metrics from it are named `*_inception_*`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedgen.core.paths import cache_dir
from fedgen.data.sources import ImageDataset
from fedgen.data.transforms import to_tensor
from fedgen.nn.classifier import EvalCNN, accuracy, train_classifier

DOMAIN_EPOCHS = 4
# sha256 of torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, the standard FID Inception weights
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


class RangeError(ValueError):
    """Images reached an extractor in the wrong range or dtype."""


def check_signed_unit_range(x: torch.Tensor) -> None:
    """Domain extractors take float images in [-1, 1]; anything else is a caller's bug, not data."""
    if not x.is_floating_point():
        raise RangeError(f"expected float images in [-1, 1], got dtype {x.dtype}")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1.001 or hi > 1.001:
        raise RangeError(f"expected images in [-1, 1], got values in [{lo:.3f}, {hi:.3f}]")


@dataclass
class Extractor:
    """A named feature extractor: `features(x)` -> (N, D) and `logits(x)` -> (N, K) for IS."""

    name: str  # "domain" or "inception"
    module: nn.Module
    note: str

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """images: float (N, C, H, W) in [-1, 1], as the generator and the data pipeline produce them."""
        feats, logits = [], []
        device = next(self.module.parameters()).device
        for chunk in images.split(batch_size):
            check_signed_unit_range(chunk)
            f, lg = self.module(chunk.to(device))
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
        return torch.cat(feats), torch.cat(logits)


class _DomainHead(nn.Module):
    def __init__(self, cnn: EvalCNN):
        super().__init__()
        self.cnn = cnn.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.cnn.features(x)
        return f, self.cnn.head(f)


def _domain_key(ds: ImageDataset, epochs: int, seed: int) -> str:
    c, h, w = ds.image_shape
    digest = hashlib.sha256(ds.train.labels.tobytes() + ds.train.images[:: max(1, len(ds.train.labels) // 64)]
                            .tobytes()).hexdigest()[:12]
    return f"domain-{ds.name}-{c}x{h}x{w}-{digest}-e{epochs}-s{seed}"


def domain_extractor(ds: ImageDataset, *, device: torch.device | str = "cpu", epochs: int = DOMAIN_EPOCHS,
                     seed: int = 0, log=print) -> tuple[Extractor, dict]:
    """The dataset's domain classifier, trained once on the real training split and cached on disk.

    It is a function of the dataset and (epochs, seed) alone, never of the run being evaluated, so domain metrics
    of different runs (other seeds, other configs) are computed with the same features and compare.
    """
    key = _domain_key(ds, epochs, seed)
    weights, info_path = cache_dir() / f"{key}.safetensors", cache_dir() / f"{key}.json"
    c = ds.image_shape[0]
    cnn = EvalCNN(c, ds.num_classes)
    if weights.exists() and info_path.exists():
        cnn.load_state_dict(load_file(weights))
        info = json.loads(info_path.read_text())
    else:
        log(f"training the domain classifier for {ds.name} ({len(ds.train.labels)} real images, {epochs} epochs); "
            f"cached in {weights}")
        x, y = to_tensor(ds.train.images), torch.from_numpy(ds.train.labels)
        cnn = train_classifier(x, y, ds.num_classes, epochs=epochs, seed=seed, device=device).cpu()
        acc = accuracy(cnn, to_tensor(ds.test.images), torch.from_numpy(ds.test.labels))
        info = {"dataset": ds.name, "real_test_accuracy": acc, "epochs": epochs, "seed": seed,
                "train_images": len(y)}
        save_file(cnn.state_dict(), weights)
        info_path.write_text(json.dumps(info))
    note = f"domain features: EvalCNN trained on real {ds.name}, real test accuracy {info['real_test_accuracy']:.4f}"
    return Extractor("domain", _DomainHead(cnn).to(device).eval(), note), info | {"cache_key": key}
