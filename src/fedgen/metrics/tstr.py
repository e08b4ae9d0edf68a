"""Train on synthetic, test on real (TSTR): the evaluation CNN trained on generated labelled samples."""

from __future__ import annotations

import torch

from fedgen.models.classifier import accuracy, train_classifier


def tstr_accuracy(synthetic: torch.Tensor, synthetic_labels: torch.Tensor, real_test: torch.Tensor,
                  real_test_labels: torch.Tensor, num_classes: int, *, epochs: int, seed: int = 0,
                  device: torch.device | str = "cpu") -> float:
    """Accuracy on the real test set of an EvalCNN trained on (synthetic, labels) with the domain recipe."""
    model = train_classifier(synthetic, synthetic_labels, num_classes, epochs=epochs, seed=seed, device=device)
    return accuracy(model, real_test, real_test_labels)
