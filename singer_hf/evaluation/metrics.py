"""Probe metrics on torchmetrics: they accumulate over a whole split and work offline
(`evaluate.load` fetches metric scripts from the Hub and fails offline). They never sync across
processes: under `accelerate launch` the features are gathered to the main process, which alone
trains and scores the heads on all of them (a sync would wait for processes that have finished).

Values are in the units of the paper's Table 1: percent for accuracy, mIoU and δ; metres for RMSE.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

IGNORE_INDEX = 255
"""Segmentation label ignored by the loss and the mIoU (ADE20K's "other" after label reduction)."""
DELTA_THRESHOLDS = (1.25, 1.25**2, 1.25**3)


def top1_accuracy(num_classes: int) -> MulticlassAccuracy:
    """Share of images whose arg-max logit is the label (micro average: every image counts once)."""
    return MulticlassAccuracy(num_classes=num_classes, average="micro", top_k=1, sync_on_compute=False)


def mean_iou(num_classes: int) -> MulticlassJaccardIndex:
    """Dataset-level mIoU: one confusion matrix over every pixel of the split, `IGNORE_INDEX`
    pixels left out, IoU averaged over the classes that occur in the labels or the predictions —
    not a mean of per-batch values (the official code's defect, docs/method.md §7)."""
    return MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=IGNORE_INDEX, sync_on_compute=False)


class DepthMetrics:
    """RMSE, abs-rel and δ<1.25ᵏ per image over its valid pixels (0 < depth < max_depth),
    each averaged over the images that have valid pixels (docs/method.md §8)."""

    def __init__(self, max_depth: float):
        self.max_depth = max_depth
        self.means = {name: MeanMetric(sync_on_compute=False) for name in ("rmse", "abs_rel", "delta1", "delta2", "delta3")}

    def to(self, device) -> DepthMetrics:
        self.means = {name: metric.to(device) for name, metric in self.means.items()}
        return self

    def update(self, predictions: torch.Tensor, depths: torch.Tensor) -> None:
        """`predictions`, `depths`: B×H×W in metres."""
        valid = (depths > 0) & (depths < self.max_depth)
        pixels = valid.flatten(1).sum(1)
        keep = pixels > 0
        if not keep.any():
            return
        predictions, depths, valid, pixels = predictions[keep], depths[keep], valid[keep], pixels[keep]
        safe = torch.where(valid, depths, torch.ones_like(depths))
        # Predictions are soft-argmax expectations in (0, max_depth); the clamp only guards the ratio.
        predicted = predictions.clamp(min=1e-6)

        def per_image(values: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, values, torch.zeros_like(values)).flatten(1).sum(1) / pixels

        self.means["rmse"].update(per_image((predicted - safe) ** 2).sqrt())
        self.means["abs_rel"].update(per_image((predicted - safe).abs() / safe))
        ratio = torch.maximum(predicted / safe, safe / predicted)
        for k, threshold in enumerate(DELTA_THRESHOLDS, start=1):
            self.means[f"delta{k}"].update(100 * per_image((ratio < threshold).float()))

    def compute(self) -> dict[str, float]:
        return {name: metric.compute().item() for name, metric in self.means.items()}
