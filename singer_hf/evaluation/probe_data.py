"""Probe datasets: images with a label, a segmentation mask or a depth map, turned into
`pixel_values` and `targets` with one geometry for image and target.

No augmentation: features are extracted once (see features.py). Classification uses the eval
geometry of `build_transforms` (resize by 256/224, centre crop); dense tasks resize the shorter
side to the model's size and centre-crop, the mask (nearest) or depth map (nearest, so invalid
zeros never blend into valid depths) with it.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..data import build_transforms, to_rgb
from .metrics import IGNORE_INDEX

DENSE_TASKS = ("image-segmentation", "depth-estimation")


def check_probe_example(example: dict, task: str, image_column: str, target_column: str, source: str) -> None:
    """Fails naming the argument when a dataset cannot feed `task` (checked on one example,
    before any model is loaded)."""
    for argument, column in (("image_column", image_column), ("label_column", target_column)):
        if column not in example:
            raise ValueError(f"{argument}={column!r} is not a column of {source}; available: {sorted(example)}")
    if task not in DENSE_TASKS:
        return
    image = example[image_column]
    width, height = image.size if isinstance(image, PIL.Image.Image) else (None, None)
    shape = np.asarray(example[target_column]).shape
    what = "segmentation masks" if task == "image-segmentation" else "depth maps"
    if len(shape) != 2 or (height is not None and shape != (height, width)):
        raise ValueError(
            f"label_column={target_column!r}: {what} of {source} must be height×width arrays matching their image "
            f"({height}×{width}); the first example's has shape {shape}"
        )


class ProbeTransform:
    """Batched `{image_column, label_column}` → `{"pixel_values", "targets"}`.

    Segmentation with `reduce_labels` (ADE20K's `scene_parse_150`): label 0 ("other") becomes
    `IGNORE_INDEX` and 1..K become 0..K−1. Depth maps are divided by `depth_scale` to give metres.
    """

    def __init__(
        self,
        task: str,
        mean,
        std,
        size: int,
        image_column: str,
        target_column: str,
        reduce_labels: bool = False,
        depth_scale: float = 1.0,
    ):
        self.task, self.image_column, self.target_column = task, image_column, target_column
        self.reduce_labels, self.depth_scale = reduce_labels, depth_scale
        if task in DENSE_TASKS:
            self.transforms = v2.Compose(
                [
                    v2.Lambda(to_rgb, PIL.Image.Image),
                    v2.ToImage(),
                    v2.Resize(size),
                    v2.CenterCrop(size),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(mean=list(mean), std=list(std)),
                ]
            )
        else:
            self.transforms = build_transforms(mean, std, size, train=False)

    def _target(self, value) -> torch.Tensor:
        if self.task == "depth-estimation":
            return torch.from_numpy(np.asarray(value).astype(np.float32) / self.depth_scale)
        mask = torch.from_numpy(np.asarray(value).astype(np.int64))
        if self.reduce_labels:
            mask = torch.where(mask == 0, IGNORE_INDEX, mask - 1)
        if mask.min() < 0 or mask.max() > IGNORE_INDEX:
            raise ValueError(
                f"label_column={self.target_column!r}: segmentation labels must lie in 0..{IGNORE_INDEX} "
                f"({IGNORE_INDEX} = ignored), got {mask.min().item()}..{mask.max().item()}"
            )
        return mask.to(torch.uint8)  # ADE20K-sized splits stay in memory

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images, targets = batch[self.image_column], batch[self.target_column]
        if self.task not in DENSE_TASKS:
            return {"pixel_values": [self.transforms(image) for image in images], "targets": list(targets)}
        pixel_values, dense = [], []
        for image, target in zip(images, targets):
            image, mask = self.transforms(image, tv_tensors.Mask(self._target(target)[None]))
            pixel_values.append(image)
            dense.append(mask[0])
        return {"pixel_values": pixel_values, "targets": dense}


def collate_probe_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
    targets = [example["targets"] for example in examples]
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "targets": torch.stack(targets) if isinstance(targets[0], torch.Tensor) else torch.tensor(targets),
    }
