"""Fashion-MNIST, the demo's data: read from Debian's idx files offline, from the Hub otherwise."""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets
import numpy as np
import torch

from ..data import ImageTransform, build_transforms, image_processor_stats

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Same names, spelling included, as the Hub copy, so both sources give identical features.
FASHION_MNIST_LABELS = [
    "T - shirt / top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
"""Training-set pixel statistics (grayscale, repeated over the RGB channels)."""
_IDX_FILES = {"train": "train", "test": "t10k"}
_IDX_MAGIC = {"images": 2051, "labels": 2049}


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """Reads one gzipped idx file (big-endian header: magic, counts, then uint8 payload)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise ValueError(f"{path} has idx magic number {magic}, expected {_IDX_MAGIC[kind]} for {kind}")
    if kind == "labels":
        return np.frombuffer(raw, np.uint8, offset=8)
    count, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)


def load_fashion_mnist(split: str = "train", data_dir: str | Path = FASHION_MNIST_DIR) -> datasets.Dataset:
    """Fashion-MNIST as ``image`` (grayscale PIL) and ``label`` (ClassLabel) columns.

    Reads the idx files that Debian's ``dataset-fashion-mnist`` ships, so the demo runs offline;
    without them it falls back to the Hub copy ``zalando-datasets/fashion_mnist``.
    """
    if split not in _IDX_FILES:
        raise ValueError(f"split={split!r} is not a Fashion-MNIST split; expected one of {sorted(_IDX_FILES)}")
    prefix = Path(data_dir) / _IDX_FILES[split]
    images_path = prefix.with_name(f"{prefix.name}-images-idx3-ubyte.gz")
    labels_path = prefix.with_name(f"{prefix.name}-labels-idx1-ubyte.gz")
    if not (images_path.is_file() and labels_path.is_file()):
        try:
            return datasets.load_dataset("zalando-datasets/fashion_mnist", split=split)
        except OSError as exc:  # ConnectionError and the Hub's offline errors are OSErrors
            raise FileNotFoundError(
                f"Fashion-MNIST idx files are not in data_dir={str(data_dir)!r} and the Hub copy "
                f"zalando-datasets/fashion_mnist could not be loaded ({exc}); install the Debian package "
                "dataset-fashion-mnist or go online"
            ) from exc

    images, labels = _read_idx(images_path, "images"), _read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    # Stored as binary PGM: the idx payload behind a short header, so no PNG compression of 70k images.
    header = f"P5 {images.shape[2]} {images.shape[1]} 255\n".encode()
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=FASHION_MNIST_LABELS))
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": header + image.tobytes(), "path": None} for image in images], "label": labels},
        features=features,
        split=split,
    )



def fashion_mnist_images(split: str, count: int, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, labels) of the first `count` images of a split after a fixed shuffle, preprocessed
    as `processor` evaluates them (resize and centre crop, its normalisation)."""
    dataset = load_fashion_mnist(split).shuffle(seed=0)
    dataset = dataset.select(range(min(count, len(dataset))))
    mean, std, size = image_processor_stats(processor)
    transform = ImageTransform(build_transforms(mean, std, size, train=False))
    return torch.stack(transform({"image": dataset["image"]})["pixel_values"]), torch.tensor(dataset["label"])
