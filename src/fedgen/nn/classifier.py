"""The evaluation CNN: domain feature extractor for FID/KID/IS and the TSTR classifier."""

from __future__ import annotations

import torch
from torch import nn

from fedgen.core.seeding import generator
from fedgen.data.transforms import random_hflip


class EvalCNN(nn.Module):
    """Small CNN, one conv per resolution (cheap enough to train on 60k images in minutes on 2 CPU cores);
    works on any input side >= 4 (global pooling before the head).

    `features(x)` is the 256-d penultimate layer (used for FID/KID/precision-recall), `forward(x)` the logits.
    Inputs are float images in [-1, 1], (N, C, H, W).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(in_channels, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
                                  block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(4 * width, 256), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(256, num_classes))
        self.num_features = 256

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 4,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, hflip: bool = False,
                     device: torch.device | str = "cpu", on_epoch=None) -> EvalCNN:
    """Train an EvalCNN on float images in [-1, 1] (Adam, one-cycle LR); deterministic for a seed on CPU."""
    with torch.random.fork_rng(devices=[]):  # init and dropout masks from `seed`, whatever ran before
        torch.manual_seed(seed)
        return _train(images, labels, num_classes, epochs, batch_size, lr, seed, hflip, device, on_epoch)


def _train(images, labels, num_classes, epochs, batch_size, lr, seed, hflip, device, on_epoch) -> EvalCNN:
    model = EvalCNN(images.shape[1], num_classes).to(device)
    gen = generator(seed, "classifier")
    steps = epochs * -(-len(labels) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for idx in order.split(batch_size):
            x = images[idx]
            if hflip:
                x = random_hflip(x, gen)
            loss = nn.functional.cross_entropy(model(x.to(device)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item()
                  for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True))
    return correct / len(labels)
