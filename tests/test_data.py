"""singer_hf.data on real (tiny) local datasets: loading, transforms, corrupt images, sharding."""

import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader
import transformers
from transformers import BitImageProcessor, ViTImageProcessor

from singer_hf.data import (
    ImageTransform,
    PixelNormalizer,
    PixelValuesCollator,
    build_transforms,
    image_processor_stats,
    load_image_dataset,
    student_image_processor,
    with_image_transform,
)
from singer_hf.demo.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist
from singer_hf.shuffle import shuffle_stream

SIZE = 16
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
MODES = ["L", "RGBA", "CMYK", "P", "I;16", "1", "LA"]
CORRUPT_IDX = 3  # position of the undecodable entry among the rows


def _images() -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8))
    return [rgb.convert(mode) for mode in MODES if mode != "I;16"] + [
        PIL.Image.fromarray(rng.integers(0, 65536, (9, 30), dtype=np.uint16))
    ]


@pytest.fixture(scope="module")
def parquet_path(tmp_path_factory) -> Path:
    """A Parquet image dataset: one image per mode, plus bytes that are no image at all."""
    rows: list = [*_images()]
    rows.insert(CORRUPT_IDX, {"bytes": b"\x89PNG\r\n\x1a\n truncated garbage", "path": None})
    path = tmp_path_factory.mktemp("data") / "images.parquet"
    features = datasets.Features(image=datasets.Image(), idx=datasets.Value("int64"))
    datasets.Dataset.from_dict({"image": rows, "idx": list(range(len(rows)))}, features=features).to_parquet(path)
    return path


def _good_ids(parquet_path) -> set[int]:
    n = len(datasets.Dataset.from_parquet(str(parquet_path)))
    return set(range(n)) - {CORRUPT_IDX}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_transforms_give_normalized_rgb_tensors(mode, train):
    image = next(image for image in _images() if image.mode == mode)
    pixels = build_transforms(MEAN, STD, SIZE, train)(image)
    assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


@pytest.mark.parametrize("train", [True, False])
def test_uint8_batches_normalised_later_equal_the_float_transforms(train):
    """Workers ship uint8 (a quarter of float32's bytes); PixelNormalizer on the batch gives the float
    pipeline's values exactly, with the same augmentation draws."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    floats, uint8 = (build_transforms(mean, std, SIZE, train, normalize=normalize) for normalize in (True, False))
    expected, shipped = [], []
    for seed, image in enumerate(_images()):
        for transforms, out in ((floats, expected), (uint8, shipped)):
            torch.manual_seed(seed)
            out.append(transforms(image))
    expected, shipped = torch.stack(expected), torch.stack(shipped)
    assert shipped.dtype == torch.uint8 and shipped.element_size() * 4 == expected.element_size()
    assert torch.equal(PixelNormalizer(mean, std)(shipped), expected)
    assert PixelNormalizer(mean, std)(expected) is expected  # float batches pass through


def test_transforms_rescale_16_bit_images_instead_of_clipping():
    mid_grey = PIL.Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16))
    assert mid_grey.mode == "I;16"
    pixels = build_transforms(MEAN, STD, SIZE, train=False)(mid_grey)
    torch.testing.assert_close(pixels, torch.full_like(pixels, (128 / 255 - 0.5) / 0.5))


def test_eval_transforms_are_deterministic_and_normalize():
    white = PIL.Image.new("L", (40, 30), 255)
    transforms = build_transforms([0.25] * 3, [0.5] * 3, SIZE, train=False)
    torch.testing.assert_close(transforms(white), torch.full((3, SIZE, SIZE), 1.5))


@pytest.mark.parametrize("streaming", [False, True])
def test_corrupt_image_is_skipped_and_counted_good_ones_survive(parquet_path, streaming):
    dataset = load_image_dataset(str(parquet_path), None, "train", "image", streaming=streaming, shuffle_buffer=4)
    assert isinstance(dataset, datasets.IterableDataset) == streaming
    transform = ImageTransform(build_transforms(MEAN, STD, SIZE, train=True), "image", label_column="idx")
    collator = PixelValuesCollator()
    batches = list(DataLoader(with_image_transform(dataset, transform), batch_size=3, collate_fn=collator))

    ids = torch.cat([batch["labels"] for batch in batches]).tolist()
    assert sorted(ids) == sorted(_good_ids(parquet_path))
    assert all(batch["pixel_values"].shape[1:] == (3, SIZE, SIZE) for batch in batches)
    assert collator.skipped == 1


def test_collator_counts_skips_made_in_dataloader_workers(parquet_path):
    dataset = load_image_dataset(str(parquet_path), None, "train", "image", streaming=False)
    transform = ImageTransform(build_transforms(MEAN, STD, SIZE, train=False), "image")
    collator = PixelValuesCollator()
    loader = DataLoader(with_image_transform(dataset, transform), batch_size=2, num_workers=2, collate_fn=collator)
    batches = list(loader)
    assert sum(len(batch["pixel_values"]) for batch in batches) == len(_good_ids(parquet_path))
    assert "labels" not in batches[0]
    assert collator.skipped == 1  # decoding happened in the workers; the one counter is shared with them


STREAM_EXAMPLES, BUFFER = 64, 4


@pytest.fixture(scope="module")
def stream_folder(tmp_path_factory) -> Path:
    """64 random images over two Parquet files (a stream shard for each of two DataLoader workers); `idx`: the row."""
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(STREAM_EXAMPLES)]
    features = datasets.Features(image=datasets.Image(), idx=datasets.Value("int64"))
    data = datasets.Dataset.from_dict({"image": images, "idx": list(range(STREAM_EXAMPLES))}, features=features)
    folder = tmp_path_factory.mktemp("stream")
    for shard in range(2):
        data.shard(2, shard, contiguous=True).to_parquet(str(folder / f"part-{shard}.parquet"))
    return folder


def _stream_loader(folder: Path, num_workers: int):
    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset = load_image_dataset(str(folder), None, "train", "image", streaming=True, shuffle_buffer=BUFFER, seed=0)
    transform = ImageTransform(build_transforms(MEAN, STD, SIZE, train=True), "image", label_column="idx", seed=0)
    return StatefulDataLoader(
        with_image_transform(dataset, transform), batch_size=4, num_workers=num_workers, collate_fn=PixelValuesCollator()
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_shuffled_stream_resumes_exactly_after_its_buffer_cycled(stream_folder, num_workers):
    """Stopped after 40 examples (10 buffers; 20 examples per worker with two), a stream resumed from the
    DataLoader's state (through torch.save and a weights-only load) gives the same examples and augmentations."""
    import io

    full = list(_stream_loader(stream_folder, num_workers))
    assert sorted(torch.cat([batch["labels"] for batch in full]).tolist()) == list(range(STREAM_EXAMPLES))
    loader = _stream_loader(stream_folder, num_workers)
    batches = iter(loader)
    head = [next(batches) for _ in range(10)]
    saved = io.BytesIO()
    torch.save(loader.state_dict(), saved)
    del batches
    resumed = _stream_loader(stream_folder, num_workers)
    resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for expected, actual in zip(full, head + list(resumed), strict=True):
        assert torch.equal(expected["labels"], actual["labels"]) and torch.equal(expected["pixel_values"], actual["pixel_values"])
    assert b"PNG" not in saved.getvalue()  # the buffers' positions, not their images


def test_the_stream_shuffle_is_datasets_buffer_with_a_bounded_stay():
    """Uncapped, the shuffle is `IterableDataset.shuffle`'s, example for example. Capped, an example read at
    position i is yielded before position i + max_cycles · buffer is read."""
    stream = datasets.Dataset.from_dict({"idx": list(range(STREAM_EXAMPLES))}).to_iterable_dataset(num_shards=2)
    rows = lambda dataset: [example["idx"] for example in dataset]  # noqa: E731
    assert rows(shuffle_stream(stream, 0, BUFFER, max_cycles=10**9)) == rows(stream.shuffle(seed=0, buffer_size=BUFFER))
    read_order = rows(shuffle_stream(stream, 0, 1))  # a 1-example buffer keeps the order in which the shards are read
    for max_cycles in (1, 2):
        order = rows(shuffle_stream(stream, 0, BUFFER, max_cycles))
        assert sorted(order) == list(range(STREAM_EXAMPLES))
        assert max(position - read_order.index(row) for position, row in enumerate(order)) < max_cycles * BUFFER


def test_collator_refuses_a_batch_with_no_decodable_image():
    with pytest.raises(ValueError, match="all 2 images"):
        PixelValuesCollator()([{"pixel_values": None}, {"pixel_values": None}])


@pytest.mark.parametrize("streaming", [False, True])
def test_unknown_image_column_lists_available_columns(parquet_path, streaming):
    with pytest.raises(ValueError, match=r"image_column='img'.*images\.parquet.*\['image', 'idx'\]"):
        load_image_dataset(str(parquet_path), None, "train", "img", streaming=streaming)


def test_schemaless_streaming_json_with_image_paths(tmp_path):
    """JSON Lines streaming has no schema up front: the column check peeks, and paths are decoded."""
    paths = []
    for i, image in enumerate(image for image in _images() if image.mode in ("L", "RGBA", "P")):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    jsonl = tmp_path / "images.jsonl"
    jsonl.write_text("".join(json.dumps({"file": str(p), "idx": i}) + "\n" for i, p in enumerate(paths)))

    with pytest.raises(ValueError, match=r"image_column='image'.*\['file', 'idx'\]"):
        load_image_dataset(str(jsonl), None, "train", "image", streaming=True)
    dataset = load_image_dataset(str(jsonl), None, "validation", "file", streaming=True, shuffle_buffer=0)
    transform = ImageTransform(build_transforms(MEAN, STD, SIZE, train=False), "file", label_column="idx")
    batch = PixelValuesCollator()(list(with_image_transform(dataset, transform)))
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert batch["labels"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("name", ["./no/such/dir", "../no_such.parquet", "/no/such/dir", "no/such/data.parquet"])
def test_missing_local_path_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"dataset_name=.*path does not exist"):
        load_image_dataset(name, None, "train", "image", streaming=False)


def test_unsupported_local_file_type(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"dataset_name=.*'\.parquet'"):
        load_image_dataset(str(path), None, "train", "image", streaming=False)


def test_image_processor_stats_uses_the_size_the_model_sees():
    vit = ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.1] * 3, image_std=[0.2] * 3)
    assert image_processor_stats(vit) == ([0.1] * 3, [0.2] * 3, 28)
    cropping = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    assert image_processor_stats(cropping)[2] == 224
    cropping.do_center_crop = False
    assert image_processor_stats(cropping)[2] == 256


def test_image_processor_stats_of_naflex_unnormalised_and_self_normalising_models():
    naflex = transformers.Siglip2ImageProcessor(patch_size=16, max_num_patches=256)
    assert image_processor_stats(naflex) == ([0.5] * 3, [0.5] * 3, 256)  # 16×16 patches of 16 px
    assert image_processor_stats(transformers.Siglip2ImageProcessor(patch_size=16, max_num_patches=200))[2] == 224
    raw = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_normalize=False)
    assert image_processor_stats(raw) == ([0.0] * 3, [1.0] * 3, 224)  # pixels in [0, 1]
    own = ([0.4, 0.5, 0.6], [0.2, 0.3, 0.4])  # what a model normalises with inside its forward
    assert image_processor_stats(raw, own) == (*own, 224)
    # The student's processor gives the pixels the run fed it: normalised with the model's statistics,
    # a square ViT processor for a NaFlex teacher; an ordinary teacher's processor is kept as it is.
    student = student_image_processor(raw, own)
    assert student.do_normalize and image_processor_stats(student) == (*own, 224) and not raw.do_normalize
    assert isinstance(student_image_processor(naflex), ViTImageProcessor) and image_processor_stats(student_image_processor(naflex))[2] == 256
    vit = ViTImageProcessor(size={"height": 28, "width": 28})
    assert student_image_processor(vit) is vit


def test_fashion_mnist_rejects_unknown_split():
    with pytest.raises(ValueError, match=r"split='validation'.*\['test', 'train'\]"):
        load_fashion_mnist("validation")


def test_fashion_mnist_test_split():
    if not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Debian package dataset-fashion-mnist is not installed ({FASHION_MNIST_DIR})")
    dataset = load_fashion_mnist("test")
    assert len(dataset) == 10_000
    assert dataset.features["label"].num_classes == 10
    assert np.bincount(dataset["label"]).tolist() == [1000] * 10
    image = dataset[0]["image"]
    assert image.mode == "L" and image.size == (28, 28) and np.asarray(image).max() > 0
    assert build_transforms(MEAN, STD, 28, train=False)(image).shape == (3, 28, 28)
