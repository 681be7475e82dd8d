#!/usr/bin/env python
"""Speed of the input pipeline: JPEG decode + training augmentation, images/s in one worker.

    python benchmarks/data.py                                  # 512 ImageNet-sized JPEGs → 224px
    python benchmarks/data.py --step_rates 2700 6700           # workers needed at these step rates
    python benchmarks/data.py --output_json outputs/data.json  # the rates also as JSON (gpu_suite.py reads it)

Writes JPEG-encoded images (ImageNet's typical 500×375) to a Parquet file in a temporary folder and
reads them back the way scripts/distill.py does (`load_image_dataset`, `ImageTransform` with the
training transforms, `with_image_transform`): map-style (`with_transform`) and streaming (`.map`),
one process, i.e. one DataLoader worker's rate, each with the float32 output (normalised in the worker)
and the uint8 output scripts/distill.py ships (normalised per batch on the device). From it: how many
workers a given training step rate needs. Streaming also reports the time to the first example
(`IterableDataset.map` decodes a whole map batch, `STREAM_MAP_BATCH` examples, before it yields anything).
"""

from __future__ import annotations

import io
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from transformers import HfArgumentParser
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from singer_hf.data import ImageTransform, build_transforms, load_image_dataset, with_image_transform

PIPELINES = {"map-style": False, "streaming": True}
"""Name: streaming."""
OUTPUTS = {"float32": True, "uint8": False}
"""Name: normalised in the worker (uint8: on the device, what scripts/distill.py ships)."""


@dataclass
class DataBenchmarkArguments:
    num_images: int = field(default=512, metadata={"help": "JPEGs written and decoded per pass."})
    source_size: list[int] = field(default_factory=lambda: [500, 375], metadata={"help": "Width and height of the JPEGs."})
    image_size: int = field(default=224, metadata={"help": "Training crop size."})
    repeats: int = field(default=3, metadata={"help": "Passes per pipeline; the median is reported."})
    step_rates: list[float] = field(
        default_factory=lambda: [2700.0, 6700.0],
        metadata={"help": "Training rates (images/s) to size the workers for; default: 40 %% and 100 %% of the paper pair's bf16 limit on an H100."},
    )
    threads: int = field(default=1, metadata={"help": "torch.set_num_threads (a DataLoader worker uses 1)."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the per-worker rates here as JSON."})


def write_jpegs(path: Path, count: int, width: int, height: int) -> None:
    """Photo-like JPEGs (smooth colour fields plus noise, quality 90) in an `image` column."""
    generator = np.random.default_rng(0)
    images = []
    for _ in range(count):
        coarse = generator.integers(0, 256, size=(height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + generator.integers(-12, 13, size=smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features(image=datasets.Image())
    datasets.Dataset.from_dict({"image": images}, features=features).to_parquet(str(path))


def pipeline(path: Path, streaming: bool, image_size: int, normalize: bool):
    dataset = load_image_dataset(str(path), None, "train", "image", streaming=streaming, shuffle_buffer=0)
    transforms = build_transforms(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, image_size, train=True, normalize=normalize)
    return with_image_transform(dataset, ImageTransform(transforms))


def one_pass(dataset) -> tuple[float, float, int, int]:
    """(seconds for the pass, seconds to the first example, examples, bytes of one example's pixel_values)."""
    start = time.perf_counter()
    first, count = None, 0
    iterator = iter(dataset) if isinstance(dataset, datasets.IterableDataset) else (dataset[i] for i in range(len(dataset)))
    for example in iterator:
        if first is None:
            first = time.perf_counter() - start
            size = example["pixel_values"].nbytes
        count += 1
    return time.perf_counter() - start, first, count, size


def measure_rates(num_images: int, source_size: list[int], image_size: int, repeats: int, outputs=tuple(OUTPUTS), report=print) -> dict[str, dict[str, float]]:
    """One worker's rate per pipeline and output ("map-style uint8", ...): images/s (median of `repeats`
    passes over `num_images` JPEGs), ms to the first example, bytes shipped per image."""
    datasets.disable_progress_bars()
    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "images.parquet"
        write_jpegs(path, num_images, *source_size)
        jpeg_kib = path.stat().st_size / num_images / 1024
        report(f"{num_images} JPEGs of {source_size[0]}×{source_size[1]} (~{jpeg_kib:.0f} KiB each) → "
               f"RandomResizedCrop({image_size}) + flip, one process, {torch.get_num_threads()} torch thread(s)")  # fmt: skip
        for name, streaming in PIPELINES.items():
            for output in outputs:
                passes = [one_pass(pipeline(path, streaming, image_size, OUTPUTS[output])) for _ in range(repeats)]
                seconds, first = statistics.median(p[0] for p in passes), statistics.median(p[1] for p in passes)
                count, size = passes[0][2], passes[0][3]
                rates[f"{name} {output}"] = {"images_per_s": count / seconds, "first_example_ms": 1e3 * first, "bytes_per_image": size}
                report(f"  {name:<10} {output:<7} {count / seconds:7.1f} images/s per worker, {size / 1024:.0f} KiB per image "
                       f"shipped ({count * size / seconds / 2**20:.1f} MiB/s); first example after {1e3 * first:.0f} ms")  # fmt: skip
    return rates


def workers_needed(step_rate: float, rates: dict[str, dict[str, float]]) -> dict[str, int]:
    """DataLoader workers each pipeline needs to feed `step_rate` images/s."""
    return {name: math.ceil(step_rate / value["images_per_s"]) for name, value in rates.items()}


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(DataBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if len(args.source_size) != 2 or min(args.source_size) < args.image_size // 4:
        raise SystemExit(f"error: --source_size: give width and height (at least {args.image_size // 4}px), got {args.source_size}")
    torch.set_num_threads(args.threads)
    rates = measure_rates(args.num_images, args.source_size, args.image_size, args.repeats)
    for rate in args.step_rates:
        needed = ", ".join(f"{name} {count}" for name, count in workers_needed(rate, rates).items())
        print(f"workers for {rate:.0f} images/s: {needed}")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        record = {"per_worker": rates, "num_images": args.num_images, "source_size": args.source_size, "image_size": args.image_size, "threads": args.threads}
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
