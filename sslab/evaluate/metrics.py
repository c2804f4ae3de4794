"""Classification metrics of a test split: top-k accuracy, the confusion matrix, per-class accuracy."""
from __future__ import annotations

from typing import Optional

import torch


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> Optional[float]:
    """Fraction of rows whose target is among the ``k`` largest logits; None when there are
    fewer than ``k`` classes (top-k is then not defined)."""
    if logits.shape[1] < k:
        return None
    top = logits.topk(k, dim=1).indices
    return float((top == targets[:, None]).any(dim=1).float().mean())


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, classes: int) -> torch.Tensor:
    """classes×classes counts; row = true class, column = predicted class."""
    index = targets.long() * classes + predictions.long()
    return torch.bincount(index.cpu(), minlength=classes * classes).reshape(classes, classes)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """top-1, top-5, per-class accuracy and the confusion matrix of ``logits`` (N×classes)."""
    logits, targets = logits.float().cpu(), targets.cpu()
    classes = logits.shape[1]
    confusion = confusion_matrix(logits.argmax(1), targets, classes)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1).float()).tolist()
    return {"top1": topk_accuracy(logits, targets, 1), "top5": topk_accuracy(logits, targets, 5),
            "per_class": per_class, "confusion": confusion.tolist()}
