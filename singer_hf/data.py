"""Data side of distillation: load an image dataset (local, Hub, streaming), turn it into ``pixel_values``.

Distillation is unsupervised, so everything here is about images; labels only ride along when a
label column is named (the demo teacher is trained with them).

Undecodable images are a fact of life in web-scale datasets. Rather than let PIL raise deep
inside a DataLoader worker hours into a run, the image column is read undecoded
(``Image(decode=False)``), decoded in :class:`ImageTransform` where a failure can be caught, and
the example is marked with ``pixel_values=None`` and the reason; :class:`PixelValuesCollator` then
drops it and counts it (one counter, shared by DataLoader workers), and stops the run when more than
a set share of the examples fails: a wrong column or a broken dataset fails early, by name. A run
warns once, at its first bad image; after that the trainer reports the counts at each log, not one
line per image and pass.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
import transformers
from torchvision.transforms import v2

from .shuffle import shuffle_stream

logger = logging.getLogger(__name__)

# Builders for a single local file; a directory is handed to ``load_dataset``, which infers its format.
_FILE_BUILDERS = {
    ".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tar": "webdataset",
}  # fmt: skip


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode to RGB. 16/32-bit integer modes are rescaled from 16 bits, since ``convert`` would clip them at 255."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        image = PIL.Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) / 257.0, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def build_transforms(image_mean, image_std, image_size: int, train: bool, normalize: bool = True) -> v2.Compose:
    """PIL image (any mode) -> normalized float tensor of shape 3 x image_size x image_size.

    Train: the usual RandomResizedCrop + flip; eval: resize by 256/224 then center crop, the
    convention ImageNet-pretrained teachers were evaluated with. `normalize=False`: the uint8
    tensor before normalisation, for `PixelNormalizer` to finish once per batch on the device.
    """
    if train:
        geometry = [v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(int(image_size * 256 / 224)), v2.CenterCrop(image_size)]
    normalization = _normalization(image_mean, image_std) if normalize else []
    return v2.Compose([v2.Lambda(to_rgb, PIL.Image.Image), *geometry, v2.ToImage(), *normalization])


def _normalization(image_mean, image_std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(image_mean), std=list(image_std))]


class PixelNormalizer:
    """uint8 pixel batches (B×3×H×W, from `build_transforms(normalize=False)`) -> the normalised float32
    that `build_transforms` gives, computed where the batch is (the accelerator).

    DataLoader workers then ship uint8: 4× fewer bytes through worker IPC, pinned memory and the
    host-to-device copy. Float batches pass through unchanged.
    """

    def __init__(self, image_mean, image_std):
        self.normalization = v2.Compose(_normalization(image_mean, image_std))

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.normalization(pixel_values) if pixel_values.dtype == torch.uint8 else pixel_values


def image_processor_stats(image_processor, normalization=None) -> tuple[list[float], list[float], int]:
    """(mean, std, size) a model expects, read from its HF image processor.

    When the processor center-crops (DINOv2, CLIP, DeiT), the model sees ``crop_size``, not ``size``.
    A NaFlex processor (SigLIP2: ``max_num_patches`` patches of ``patch_size``, any aspect ratio) gives
    square images of ``floor(sqrt(max_num_patches))`` patches a side. A processor that does not
    normalise gives pixels in [0, 1] (mean 0, std 1). timm checkpoints (``TimmWrapperImageProcessor``,
    e.g. the paper's teachers) keep all three in their ``data_config``. ``normalization``: the (mean,
    std) a model normalises with inside its forward (``ResolvedViT.input_normalization``), which
    replaces the processor's.
    """
    data_config = getattr(image_processor, "data_config", None)
    if data_config is not None:
        mean, std, size = list(data_config["mean"]), list(data_config["std"]), int(data_config["input_size"][-1])
    else:
        (mean, std), size = _processor_normalization(image_processor), _processor_size(image_processor)
    if normalization is not None:
        mean, std = list(normalization[0]), list(normalization[1])
    return mean, std, size


def _processor_normalization(image_processor) -> tuple[list[float], list[float]]:
    mean, std = list(image_processor.image_mean), list(image_processor.image_std)
    if not getattr(image_processor, "do_normalize", True):  # pixels stay in [0, 1]
        return [0.0] * len(mean), [1.0] * len(std)
    return mean, std


def _processor_size(image_processor) -> int:
    max_patches = getattr(image_processor, "max_num_patches", None)
    if getattr(image_processor, "size", None) is None and max_patches:
        return int(max_patches**0.5) * int(image_processor.patch_size)
    size = image_processor.size
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        size = image_processor.crop_size
    if not isinstance(size, int):  # a dict, or a SizeDict in transformers 5
        size = size.get("height") or size.get("shortest_edge")
    if not size:
        raise ValueError(
            f"image_processor.size={image_processor.size!r} has neither 'height' nor 'shortest_edge'; cannot pick an image size"
        )
    return int(size)


def student_image_processor(teacher_processor, normalization=None):
    """The processor saved with the student: it gives exactly the pixels the student learnt on.

    That is the teacher's processor when it gives fixed-size normalised images. A timm teacher's
    processor lives in its model's config.json and cannot be saved on its own, and a NaFlex one gives
    images of any aspect ratio as patch sequences: an HF `ViTImageProcessor` with the same statistics
    and size stands in for them. ``normalization``: the statistics a teacher normalises with inside
    its forward (C-RADIO); the pixels were normalised with them, so the student's processor does so.
    """
    mean, std, size = image_processor_stats(teacher_processor, normalization)
    naflex = getattr(teacher_processor, "size", None) is None and getattr(teacher_processor, "max_num_patches", None)
    if getattr(teacher_processor, "data_config", None) is not None or naflex:
        return transformers.ViTImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    if normalization is None:
        return teacher_processor
    processor = copy.deepcopy(teacher_processor)
    processor.do_normalize, processor.image_mean, processor.image_std = True, mean, std
    return processor


def load_image_dataset(
    name_or_path: str,
    config_name: str | None,
    split: str,
    image_column: str,
    streaming: bool,
    shuffle_buffer: int = 10_000,
    seed: int = 0,
    data_files=None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """``datasets.load_dataset`` for a Hub name, a local directory, or a single local data file.

    A path-looking name that does not exist is an error here rather than a confusing Hub lookup.
    Streaming datasets are shuffled through a ``shuffle_buffer``-example buffer that resumes exactly
    (:func:`shuffle.shuffle_stream`; 0 disables it, e.g. for evaluation); map-style ones are left to the
    Trainer's sampler.
    """
    if trust_remote_code:
        raise ValueError(
            "trust_remote_code=True is not supported: datasets>=4 dropped loading scripts; use a dataset stored as "
            "Parquet, Arrow, JSON Lines or an image folder"
        )
    path = Path(name_or_path).expanduser()
    kwargs: dict[str, Any] = dict(name=config_name, split=split, streaming=streaming, data_files=data_files)
    if revision is not None:  # a Hub dataset's git revision; local data has none
        kwargs["revision"] = revision
    source = name_or_path
    if name_or_path.startswith(("/", "./", "../", "~")) or path.suffix.lower() in _FILE_BUILDERS or path.exists():
        if not path.exists():
            raise ValueError(f"dataset_name={name_or_path!r} looks like a local path, but the path does not exist")
        if path.is_file():
            if data_files is not None:
                raise ValueError(f"data_files={data_files!r} cannot be combined with dataset_name={name_or_path!r}, a file")
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"dataset_name={name_or_path!r} is a file of unsupported type; expected a directory or one of "
                    f"{sorted(_FILE_BUILDERS)}"
                )
            # The file is whichever split was asked for ("validation", "train[:100]", ...).
            kwargs["data_files"] = {split.partition("[")[0]: str(path)}
            source = builder
        else:
            source = str(path)
    # The column is checked on a stream first: it reads the schema (or one example), not the whole
    # dataset, so a wrong column fails before a map-style dataset is downloaded and prepared.
    stream = datasets.load_dataset(source, **{**kwargs, "streaming": True})
    columns = stream.column_names
    if columns is None:  # a format without a schema: look at one example
        columns = list(next(iter(stream), {}))
    if image_column not in columns:
        raise ValueError(f"image_column={image_column!r} is not a column of {name_or_path!r}; available: {columns}")
    feature = (stream.features or {}).get(image_column)
    if feature is not None and not _may_hold_images(feature):
        raise ValueError(
            f"image_column={image_column!r} holds {feature}, not images (an Image feature, bytes, or paths); "
            f"columns of {name_or_path!r}: {columns}"
        )
    dataset = stream if streaming else datasets.load_dataset(source, **kwargs)
    if streaming and shuffle_buffer:
        dataset = shuffle_stream(dataset, seed, shuffle_buffer)
    return dataset


def _may_hold_images(feature) -> bool:
    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, dict):  # {"bytes", "path"} structs, as a Parquet file without HF metadata has them
        return "bytes" in feature or "path" in feature
    return isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary", "string", "large_string")


STREAM_MAP_BATCH = 16
EXAMPLE_INDEX = "example_index"
"""Column added to map-style datasets (and filled from the stream position when streaming) so that a
failing example can be named."""
IMAGE_ERROR = "image_error"
"""Per example: None, or (what the index is, the index, the reason) when its image is unusable."""
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def _reason(error: Exception) -> str:
    """`Type: message` of a decoding failure, without object reprs (PIL names an in-memory file it
    cannot identify as `<_io.BytesIO object at 0x…>`, which says nothing to the user)."""
    message = _OBJECT_REPR.sub("", str(error)).strip()
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class ImageTransform:
    """Batched ``{image_column: [...]} -> {"pixel_values": [tensor | None], "image_error", "example_index", ["labels"]}``.

    An image that cannot be decoded (or is missing) becomes ``pixel_values=None`` with where it is and
    why in ``image_error``, instead of an exception; :class:`PixelValuesCollator` drops and counts it.
    Apply it with :func:`with_image_transform`.
    """

    def __init__(self, transforms, image_column: str = "image", label_column: str | None = None, seed: int | None = None):
        self.transforms = transforms
        self.image_column = image_column
        self.label_column = label_column
        self.seed, self.epoch = seed, 0
        self._decoder = datasets.Image()

    def set_epoch(self, epoch: int) -> None:
        """Called at each epoch start (before the DataLoader's workers copy this object)."""
        self.epoch = epoch

    def _augment(self, image: PIL.Image.Image, index: int | None) -> torch.Tensor:
        """The transforms, with ``seed`` set: drawn from a seed of (seed, epoch, example index), the global RNG untouched.

        So an example's augmentation depends on nothing else: not on the process or DataLoader worker
        that reads it, nor on what was read before, which makes a resumed run read exactly the
        augmented images an uninterrupted one would.
        """
        if self.seed is None or index is None:
            return self.transforms(image)
        generator = torch.default_generator  # torchvision v2 draws from it; seeding it alone is cheap
        state = generator.get_state()
        generator.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1, np.uint64)[0]))
        try:
            return self.transforms(image)
        finally:
            generator.set_state(state)

    def _decode(self, value) -> tuple[PIL.Image.Image | None, str | None]:
        if value is None or (isinstance(value, dict) and value.get("bytes") is None and value.get("path") is None):
            return None, "no image"
        if isinstance(value, str):
            value = {"path": value, "bytes": None}
        elif isinstance(value, (bytes, bytearray)):
            value = {"path": None, "bytes": bytes(value)}
        try:
            image = self._decoder.decode_example(value)  # bytes, local or remote path; applies EXIF rotation
            return to_rgb(image), None  # forces a full decode, so a truncated file fails here too
        except Exception as exc:  # PIL reports corrupt data with many exception types (OSError, SyntaxError, ...)
            return None, _reason(exc)

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        # A map-style dataset's index is its row; a stream's (`with_indices`) is the position in this
        # pass over the shuffled stream, which says where an image was read, not where it is stored.
        where = "row" if indices is None else "stream position"
        if indices is None:
            indices = batch.get(EXAMPLE_INDEX, [None] * len(batch[self.image_column]))
        pixel_values, errors = [], []
        for index, value in zip(indices, batch[self.image_column]):
            image, reason = self._decode(value)
            pixel_values.append(None if image is None else self._augment(image, index))
            errors.append(None if reason is None else (where, index, reason))
        out = {"pixel_values": pixel_values, IMAGE_ERROR: errors, EXAMPLE_INDEX: list(indices)}
        if self.label_column is not None:
            out["labels"] = batch[self.label_column]
        return out


def with_image_transform(dataset, transform: ImageTransform):
    """Lazily applies ``transform``: ``with_transform`` for map-style, ``map`` for streaming
    (IterableDataset has no ``with_transform``).

    The image column is first cast to ``Image(decode=False)`` so decoding happens inside the
    transform, where a corrupt image can be caught. Examples carry their index (map-style) or
    stream position (streaming) so that failures can be named. With a map-style dataset under the
    Trainer, set ``remove_unused_columns=False``: otherwise it drops the image column before the
    transform sees it.
    """
    column = transform.image_column
    if isinstance((dataset.features or {}).get(column), datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    if isinstance(dataset, datasets.IterableDataset):
        # Small map batches: a stream resumed from a saved position re-reads at most one of them.
        return dataset.map(
            transform, batched=True, batch_size=STREAM_MAP_BATCH, with_indices=True, remove_columns=dataset.column_names
        )
    if EXAMPLE_INDEX not in dataset.column_names:
        dataset = dataset.add_column(EXAMPLE_INDEX, np.arange(len(dataset)))
    return dataset.with_transform(transform)


class PixelValuesCollator:
    """Stacks ``pixel_values`` (and ``labels``), dropping the examples :class:`ImageTransform` marked undecodable.

    ``seen`` and ``skipped`` count the examples collated and dropped so far, across DataLoader worker
    processes (the counters live in shared memory), so the trainer can log them. The run's first bad
    image is named in one warning; the trainer then reports the counts at each log. When more than
    ``max_bad_share`` of the examples fail (counted over at least the first ``window`` examples, so a
    bad column fails within them), it raises, naming the column, the counts and failing examples.
    """

    def __init__(self, image_column: str = "image", max_bad_share: float = 0.1, window: int = 1000):
        if not 0 <= max_bad_share <= 1:
            raise ValueError(f"max_bad_image_share: must be in [0, 1], got {max_bad_share}")
        if window < 1:
            raise ValueError(f"bad_image_window: must be >= 1, got {window}")
        self.image_column, self.max_bad_share, self.window = image_column, max_bad_share, window
        # seen, skipped; a spawn-context lock can be shared with workers started by fork, spawn and forkserver alike.
        self._counts = multiprocessing.get_context("spawn").Array("q", 2)
        self._failures: list[tuple] = []  # this process's first failures (where, index, reason), for the error message

    @property
    def seen(self) -> int:
        return self._counts[0]

    @property
    def skipped(self) -> int:
        return self._counts[1]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        kept = [example for example in examples if example["pixel_values"] is not None]
        failures = [example.get(IMAGE_ERROR) or ("example", None, "no image") for example in examples if example["pixel_values"] is None]
        with self._counts.get_lock():
            self._counts[0] += len(examples)
            self._counts[1] += len(failures)
            seen, skipped = self._counts[0], self._counts[1]
        self._failures += failures[: 5 - len(self._failures)]
        if failures:
            allowed = int(self.max_bad_share * max(seen, self.window))
            if skipped > allowed:
                raise ValueError(
                    f"image_column={self.image_column!r}: {skipped} of the first {seen:,} examples have no usable image, more "
                    f"than max_bad_image_share={self.max_bad_share:g} allows ({_allowance(allowed, seen, self.window)}); "
                    f"e.g. {_describe(self._failures)}"
                )
            if skipped == len(failures):  # the run's first bad images (across workers: the counter is shared)
                logger.warning(
                    "image_column=%r: %s; such examples are skipped, counted in `skipped_images` and summed up at each log",
                    self.image_column, _describe(failures[:5]),
                )  # fmt: skip
        if not kept:
            raise ValueError(
                f"image_column={self.image_column!r}: all {len(examples)} images of a batch are unusable; e.g. "
                f"{_describe(failures[:5])}"
            )
        batch = {"pixel_values": torch.stack([example["pixel_values"] for example in kept])}
        if "labels" in kept[0]:
            batch["labels"] = torch.tensor([example["labels"] for example in kept])
        return batch


def _allowance(allowed: int, seen: int, window: int) -> str:
    return f"at most {allowed:,} in the first bad_image_window={window:,}" if seen < window else f"at most {allowed:,} of {seen:,}"


def _describe(failures: list[tuple]) -> str:
    """`rows 3, 7 (UnidentifiedImageError: cannot identify image file); row 9 (no image)`: indices grouped by reason."""
    groups: dict[tuple[str, str], list] = {}
    for where, index, reason in failures:
        groups.setdefault((where, reason), []).append(index)
    parts = []
    for (where, reason), indices in groups.items():
        known = [str(index) for index in sorted(index for index in indices if index is not None)]
        plural = "s" if len(indices) > 1 else ""
        parts.append(f"{where}{plural} {', '.join(known)} ({reason})" if known else f"{len(indices)} {where}{plural} ({reason})")
    return "; ".join(parts)
