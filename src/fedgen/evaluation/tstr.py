"""Train on synthetic, test on real (TSTR): the evaluation CNN trained on generated labelled samples."""

from __future__ import annotations

import torch

from fedgen.core.progress import task
from fedgen.nn.classifier import accuracy, train_classifier


def tstr_accuracy(synthetic: torch.Tensor, synthetic_labels: torch.Tensor, real_test: torch.Tensor,
                  real_test_labels: torch.Tensor, num_classes: int, *, epochs: int, seed: int = 0,
                  device: torch.device | str = "cpu", progress=None, what: str = "TSTR classifier") -> float:
    """Accuracy on the real test set of an EvalCNN trained on (synthetic, labels) with the domain recipe; its
    epochs on `progress` (a bar with an ETA) when given one."""
    with task(progress, f"{what}: epochs", epochs) as advance:
        model = train_classifier(synthetic, synthetic_labels, num_classes, epochs=epochs, seed=seed, device=device,
                                 on_epoch=None if advance is None else lambda _: advance())
    return accuracy(model, real_test, real_test_labels)


def silo_baselines(images: torch.Tensor, labels: torch.Tensor, client_indices: list, real_test: torch.Tensor,
                   real_test_labels: torch.Tensor, num_classes: int, *, epochs: int, seed: int = 0,
                   device: torch.device | str = "cpu", progress=None) -> dict:
    """The PGA paper's "local" baseline: each silo's own CNN (the TSTR recipe) trained on its real data alone,
    tested on the real test set; per silo and the mean. Empty when the silos' indices are not known here."""
    if not client_indices or any(len(idx) == 0 for idx in client_indices):
        return {}
    accuracies = {str(i): tstr_accuracy(images[torch.as_tensor(idx)], labels[torch.as_tensor(idx)], real_test,
                                        real_test_labels, num_classes, epochs=epochs, seed=seed, device=device,
                                        progress=progress, what=f"silo {i} baseline")
                  for i, idx in enumerate(client_indices)}
    return {"local_real_accuracy": accuracies,
            "local_real_accuracy_mean": sum(accuracies.values()) / len(accuracies)}
