"""PGA's networks: a class-conditional DCGAN generator, and a zoo of class-conditional discriminators that differ
in depth, width and layer kinds (the paper's point: each party keeps a discriminator of its own architecture).

Images are (N, C, H, W) in [-1, 1] with H and W divisible by 4. Conditioning: the generator embeds the label
next to z; convolutional discriminators see the label as one-hot planes stacked on the image channels, the MLP
as a one-hot vector next to the flattened image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedgen.config import Config
from fedgen.config.choices import DISCRIMINATORS
from fedgen.core.errors import UsageError
from fedgen.core.seeding import derive_seed


class ConditionalGenerator(nn.Module):
    """DCGAN generator: [z, embed(y)] -> linear -> (4w, H/4, W/4) -> two stride-2 transposed convs -> tanh."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, z_dim: int = 100, width: int = 64):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise UsageError(f"the GAN needs an image side divisible by 4, got {h}x{w}; set data.image_size")
        self.z_dim, self.num_classes, self.start = z_dim, num_classes, (h // 4, w // 4)
        self.embed = nn.Embedding(num_classes, 50)
        self.project = nn.Sequential(nn.Linear(z_dim + 50, 2 * width * self.start[0] * self.start[1]),
                                     nn.BatchNorm1d(2 * width * self.start[0] * self.start[1]), nn.ReLU(True))
        self.body = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.ConvTranspose2d(width, c, 4, 2, 1), nn.Tanh(),
        )
        self.width = width

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.project(torch.cat([z, self.embed(labels)], 1))
        return self.body(x.view(len(z), 2 * self.width, *self.start))


def new_generator(cfg: Config, image_shape: tuple[int, int, int], num_classes: int,
                  device: torch.device) -> ConditionalGenerator:
    """The run's generator (its shape from the `pga` or `merf` section), initialised from the run seed."""
    shape = cfg.merf if cfg.algorithm == "merf" else cfg.pga
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.train.seed, "pga-init-g"))
        return ConditionalGenerator(image_shape, num_classes, shape.z_dim, shape.width).to(device)



@dataclass
class GANSampler:
    """A class-conditional generator G(z, y), z ~ N(0, I) from the seed."""

    generator: torch.nn.Module
    batch_size: int = 500

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    evaluations_per_image = 1

    def describe(self) -> dict:
        return {"sampler": "gan", "steps": 1}

    def check(self) -> None:
        return None

    @torch.no_grad()
    def images(self, labels: torch.Tensor, seed: int, progress=None) -> torch.Tensor:
        self.generator.eval()
        gen = torch.Generator().manual_seed(seed)
        out = []
        for chunk in labels.split(self.batch_size):
            z = torch.randn(len(chunk), self.generator.z_dim, generator=gen)
            out.append(self.generator(z.to(self.device), chunk.to(self.device)).clamp(-1, 1).cpu())
            if progress is not None:
                progress(len(chunk))
        return torch.cat(out)


def _label_planes(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    onehot = nn.functional.one_hot(labels, num_classes).to(x.dtype)
    return torch.cat([x, onehot[:, :, None, None].expand(-1, -1, *x.shape[2:])], 1)


class _ConvD(nn.Module):
    """A convolutional body on the image with the label as one-hot planes (`conditional`), or on the image alone
    (the auxiliary-classifier discriminator, whose body ends in 1 + K outputs)."""

    def __init__(self, body: nn.Module, num_classes: int, conditional: bool = True):
        super().__init__()
        self.body, self.num_classes, self.conditional = body, num_classes, conditional

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.body(_label_planes(x, labels, self.num_classes) if self.conditional else x)
        return out.view(-1) if out.shape[1] == 1 else out


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.LeakyReLU(0.2, True),
                                  nn.Conv2d(cout, cout, 3, 1, 1), nn.AvgPool2d(2))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.AvgPool2d(2))
        self.out = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.main(x) + self.skip(x))


class _MLPD(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, width: int = 512,
                 auxiliary: bool = False):
        super().__init__()
        self.num_classes, self.conditional = num_classes, not auxiliary
        d = image_shape[0] * image_shape[1] * image_shape[2]
        self.body = nn.Sequential(nn.Linear(d + (0 if auxiliary else num_classes), width), nn.LeakyReLU(0.2, True),
                                  nn.Linear(width, width // 2), nn.LeakyReLU(0.2, True),
                                  nn.Linear(width // 2, 1 + (num_classes if auxiliary else 0)))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.conditional:
            return self.body(x.flatten(1))
        onehot = nn.functional.one_hot(labels, self.num_classes).to(x.dtype)
        return self.body(torch.cat([x.flatten(1), onehot], 1)).view(-1)


def _dcgan(c: int, k: int, width: int, norm: str | None, out: int = 1) -> nn.Module:
    def block(cin: int, cout: int, norm: str | None) -> list[nn.Module]:
        layer = {"batch": lambda: nn.BatchNorm2d(cout), "group": lambda: nn.GroupNorm(min(32, cout // 4), cout)}
        return [nn.Conv2d(cin, cout, 4, 2, 1), *([layer[norm]()] if norm else []), nn.LeakyReLU(0.2, True)]

    return nn.Sequential(*block(c + k, width, None), *block(width, 2 * width, norm), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(2 * width, out))


def build_discriminator(kind: str, image_shape: tuple[int, int, int], num_classes: int,
                        private: bool = False, auxiliary: bool = False, spectral_norm: bool = False) -> nn.Module:
    """One discriminator of the zoo, outputting one logit per image given the image and its label. `private`: the
    DP-SGD variant (BatchNorm, which mixes the records of a batch and so has no per-sample gradient, replaced by
    GroupNorm). `auxiliary` (AC-GAN, Odena et al. 2017): the network sees the image alone and outputs 1 + K
    logits per image, real-vs-fake then one per class (the label is ignored). `spectral_norm` (Miyato et al.
    2018): every convolution and linear layer's weight divided by its largest singular value (one power
    iteration per training forward pass), which bounds the discriminator's Lipschitz constant."""
    model = _build(kind, image_shape, num_classes, private, auxiliary)
    if spectral_norm:
        for module in list(model.modules()):
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.utils.parametrizations.spectral_norm(module)
    if private:  # Opacus's backward hooks cannot see through in-place activations
        for module in model.modules():
            if hasattr(module, "inplace"):
                module.inplace = False
    return model


def _build(kind: str, image_shape: tuple[int, int, int], num_classes: int, private: bool,
           auxiliary: bool) -> nn.Module:
    c, k = image_shape[0], num_classes
    planes, out = (0, 1 + k) if auxiliary else (k, 1)  # label planes in, logits out
    if kind == "dcgan":
        return _ConvD(_dcgan(c, planes, 64, "group" if private else "batch", out), k, not auxiliary)
    if kind == "tiny":
        return _ConvD(_dcgan(c, planes, 16, None, out), k, not auxiliary)
    if kind == "resnet":
        return _ConvD(nn.Sequential(_Residual(c + planes, 32), _Residual(32, 64), nn.AdaptiveAvgPool2d(1),
                                    nn.Flatten(), nn.Linear(64, out)), k, not auxiliary)
    if kind == "wide":
        return _ConvD(nn.Sequential(nn.Conv2d(c + planes, 128, 5, 2, 2), nn.LeakyReLU(0.2, True),
                                    nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, out)), k, not auxiliary)
    if kind == "mlp":
        return _MLPD(image_shape, k, auxiliary=auxiliary)
    raise UsageError(f"unknown discriminator {kind!r}; expected one of {', '.join(DISCRIMINATORS)}")
