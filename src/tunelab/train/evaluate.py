"""Evaluation: accuracy, macro-F1 and mean loss over a split, in length-sorted batches without gradients."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ..data import Encoded
from .batches import collate, eval_batches


def predict(model: nn.Module, data: Encoded, batch_size: int, device: torch.device,
            autocast=contextlib.nullcontext) -> tuple[np.ndarray, float]:
    """Predicted label ids in the split's own row order, and the mean cross-entropy loss."""
    was_training = model.training
    model.eval()
    preds = np.empty(len(data), dtype=np.int64)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    with torch.inference_mode(), autocast():
        for rows in eval_batches(data.lengths, batch_size):
            batch = collate(data, rows, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss_sum += nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").double()
            preds[rows] = logits.argmax(-1).cpu().numpy()
    model.train(was_training)
    return preds, float(loss_sum) / max(len(data), 1)


def classification_metrics(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    f1s = []
    for label in range(num_labels):
        tp = np.sum((preds == label) & (labels == label))
        fp = np.sum((preds == label) & (labels != label))
        fn = np.sum((preds != label) & (labels == label))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(preds == labels)) if len(labels) else float("nan"),
            "f1_macro": float(np.mean(f1s))}


def evaluate(model: nn.Module, data: Encoded, batch_size: int, device: torch.device, num_labels: int,
             autocast=contextlib.nullcontext) -> dict[str, float]:
    preds, loss = predict(model, data, batch_size, device, autocast)
    return {**classification_metrics(preds, data.labels, num_labels), "loss": loss}
