"""Probe datasets: images with a label, a segmentation mask or a depth map, turned into
`pixel_values` and `targets` with one geometry for image and target.

Evaluation geometry (test splits, and training splits with `augmentation="none"`, whose features
are then extracted once, see features.py): classification uses `build_transforms`' eval path
(resize by 256/224, centre crop); dense tasks resize the shorter side to the model's size and
centre-crop. `augmentation="paper"` gives the training splits the official probes' random
augmentation (`paper_augmentation`). Masks and depth maps follow the image's geometry with
nearest interpolation (so invalid zero depths never blend into valid ones).
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
AUGMENTATIONS = ("none", "paper")
NYUD_CROP = 0.8


def paper_augmentation(task: str, size: int) -> tuple[list[v2.Transform], str]:
    """The official probes' training augmentation (SiNGER repo, `mdistiller/dataset/{imagenet,
    ade20k,nyud_v2}.py` and `tools/lineval/nyud.py`) as torchvision v2 transforms on a uint8 image
    (and its `tv_tensors.Mask`), with a description for results.json."""
    if task == "image-classification":
        return [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()], f"RandomResizedCrop {size} (scale 0.08–1), horizontal flip"
    jitter = v2.RandomApply(
        [v2.ColorJitter(brightness=(0.8, 1.2), contrast=(0.8, 1.2), saturation=(0.9, 1.1), hue=(-0.05, 0.05))], p=0.7
    )
    colour = "colour jitter (brightness/contrast 0.8–1.2, saturation 0.9–1.1, hue ±0.05) with p 0.7"
    if task == "image-segmentation":
        geometry = [v2.RandomResizedCrop(size, scale=(0.7, 1.0)), v2.RandomHorizontalFlip()]
        return [*geometry, jitter], f"RandomResizedCrop {size} (scale 0.7–1), horizontal flip, {colour}; mask alike (nearest)"
    # NYUd: a random 0.8 square of the centre square, resized to `size` (= centre square resized to size/0.8, then a random crop)
    square = round(size / NYUD_CROP)
    geometry = [v2.Resize(square), v2.CenterCrop(square), v2.RandomCrop(size), v2.RandomHorizontalFlip()]
    description = f"random {NYUD_CROP:g} square crop of the centre square resized to {size}, horizontal flip, {colour}"
    return [*geometry, jitter], f"{description}; depth alike (nearest)"


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
    `augmentation="paper"`: random training augmentation (`paper_augmentation`), a fresh draw per call.
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
        augmentation: str = "none",
    ):
        self.task, self.image_column, self.target_column = task, image_column, target_column
        self.reduce_labels, self.depth_scale = reduce_labels, depth_scale
        if augmentation == "none" and task not in DENSE_TASKS:
            self.transforms = build_transforms(mean, std, size, train=False)
            return
        geometry = paper_augmentation(task, size)[0] if augmentation == "paper" else [v2.Resize(size), v2.CenterCrop(size)]
        self.transforms = v2.Compose(
            [
                v2.Lambda(to_rgb, PIL.Image.Image),
                v2.ToImage(),
                *geometry,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(mean), std=list(std)),
            ]
        )

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
