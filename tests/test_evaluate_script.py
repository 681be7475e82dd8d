"""singer_hf.commands.evaluate (scripts/evaluate.py, singer-evaluate) end to end on a tiny ViT folder and tiny datasets written to disk as Parquet:
classification, segmentation (synthetic masks) and depth (synthetic depth maps)."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import transformers
from conftest import IMAGE, make_vit
from standins import newer_families

from singer_hf.commands import evaluate as evaluate_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("backbone")
    make_vit(hidden=32, layers=2).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(folder)
    return str(folder)


def _images(brightness: np.ndarray, height: int = 40, width: int = 48) -> list[np.ndarray]:
    """RGB uint8 images, left half dark, right half at `brightness`, with a little noise."""
    rng = np.random.default_rng(0)
    images = []
    for value in brightness:
        image = rng.integers(0, 20, (height, width, 3)).astype(np.uint8)
        image[:, width // 2 :] += np.uint8(value)
        images.append(image)
    return images


def _write(folder: Path, splits: dict[str, dict], features: datasets.Features) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for split, columns in splits.items():
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return str(folder)


def classification_data(folder: Path) -> str:
    labels = np.arange(48) % 2  # class = bright or dim right half
    columns = {"image": _images(60 + 150 * labels), "label": labels.tolist()}
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["dim", "bright"]))
    return _write(folder, {"train": columns, "validation": columns}, features)


def segmentation_data(folder: Path, height: int = 40, width: int = 48) -> str:
    mask = np.zeros((height, width), np.uint8)  # 0 = "other", ignored with --reduce_labels
    mask[4:, : width // 2], mask[4:, width // 2 :] = 1, 2
    count = 12
    columns = {"image": _images(np.full(count, 200)), "annotation": [mask] * count}
    features = datasets.Features(image=datasets.Image(), annotation=datasets.Image())
    return _write(folder, {"train": columns, "validation": columns}, features)


def depth_data(folder: Path, height: int = 40, width: int = 48, depth_shape=None) -> str:
    levels = np.linspace(1, 8, 12)
    depths = [np.full(depth_shape or (height, width), level, np.float32) for level in levels]
    for depth in depths:
        depth[:3] = 0  # invalid pixels: no measurement
    columns = {"image": _images(20 * levels), "depth": [d.tolist() for d in depths]}
    shape = depth_shape or (height, width)
    features = datasets.Features(image=datasets.Image(), depth=datasets.Array2D(shape, "float32"))
    return _write(folder, {"train": columns, "validation": columns}, features)


def run(backbone: str, data: str, output: Path, *flags: str) -> dict:
    evaluate_script.main(["--model_name_or_path", backbone, "--dataset_name", data, "--output_dir", str(output),
                          "--num_workers", "0", "--batch_size", "8", *flags])  # fmt: skip
    return json.loads((output / "results.json").read_text())


def test_classification_probe_end_to_end_with_selection_on_held_out_train(backbone, tmp_path):
    data = classification_data(tmp_path / "cls")
    results = run(backbone, data, tmp_path / "out", "--learning_rates", "0.01", "0.5", "--epochs", "30")
    assert results["schema"] == "singer-hf/probe-results" and results["schema_version"] == 1
    assert results["backbone"]["name_or_path"] == Path(backbone).name  # never the absolute path
    loaded = transformers.AutoModel.from_pretrained(backbone)
    assert results["backbone"]["num_parameters"] == sum(p.numel() for p in loaded.parameters())
    (result,) = results["results"]
    assert result["task"] == "image-classification"
    assert result["dataset"] == {"name": "cls", "config": None, "split": "validation", "revision": None, "num_examples": 48}
    (metric,) = result["metrics"]
    assert metric["type"] == "accuracy" and metric["unit"] == "%"
    assert metric["value"] > 90  # brightness is linearly readable from a random ViT's CLS token
    settings = result["settings"]
    assert settings["selected_learning_rate"] in (0.01, 0.5) and set(settings["held_out_scores"]) == {"0.01", "0.5"}
    assert "held-out 0.1 of the training split" in settings["selection_rule"]
    assert settings["num_train_examples"] == 48 - 5
    assert "| image-classification | cls | validation | 48 |" in (tmp_path / "out" / "results.md").read_text()


def test_segmentation_probe_ignores_other_and_scores_dataset_level_miou(backbone, tmp_path):
    data = segmentation_data(tmp_path / "seg")
    results = run(backbone, data, tmp_path / "out", "--task", "image-segmentation", "--label_column", "annotation",
                  "--reduce_labels", "true", "--epochs", "40", "--learning_rates", "0.5")  # fmt: skip
    (result,) = results["results"]
    assert result["settings"]["num_classes"] == 2  # labels 1, 2; 0 ("other") ignored
    (metric,) = result["metrics"]
    assert metric["type"] == "mean_iou" and 50 < metric["value"] <= 100  # left/right halves are linearly separable


def test_depth_probe_reports_rmse_absrel_and_deltas(backbone, tmp_path):
    data = depth_data(tmp_path / "depth")
    results = run(backbone, data, tmp_path / "out", "--task", "depth-estimation", "--label_column", "depth", "--epochs", "10")
    (result,) = results["results"]
    metrics = {m["type"]: m for m in result["metrics"]}
    assert list(metrics) == ["rmse", "abs_rel", "delta1", "delta2", "delta3"]
    assert metrics["rmse"]["unit"] == "m" and 0 < metrics["rmse"]["value"] < 10
    assert 0 <= metrics["delta1"]["value"] <= metrics["delta2"]["value"] <= metrics["delta3"]["value"] <= 100


@pytest.mark.parametrize(
    "make_data, flags, message",
    [
        (classification_data, ["--label_column", "fine_label"], r"label_column='fine_label' is not a column of .*available: \['image', 'label'\]"),
        (lambda folder: depth_data(folder, depth_shape=(8, 8)), ["--task", "depth-estimation", "--label_column", "depth"],
         r"label_column='depth': depth maps of .* must be height×width arrays matching their image \(40×48\); .* shape \(8, 8\)"),
        (classification_data, ["--learning_rates", "0.5", "-1"], r"learning_rates=\[0.5, -1.0\]: give one or more positive values"),
    ],
)  # fmt: skip
def test_bad_input_fails_naming_the_argument(backbone, tmp_path, make_data, flags, message):
    with pytest.raises(ValueError, match=message):
        run(backbone, make_data(tmp_path / "data"), tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


def test_unsupported_backbone_is_one_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "resnet"
    transformers.ResNetModel(transformers.ResNetConfig(hidden_sizes=[8], depths=[1], embedding_size=8)).save_pretrained(folder)
    data = classification_data(tmp_path / "cls")
    argv = ["evaluate.py", "--model_name_or_path", str(folder), "--dataset_name", data, "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:  # what `python scripts/evaluate.py ...` prints to stderr, status 2
        runpy.run_path(str(ROOT / "scripts" / "evaluate.py"), run_name="__main__")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert message.startswith("error: model_name_or_path: unsupported model type 'resnet'") and "supported: " in message


def test_augmented_classification_probe_end_to_end(backbone, tmp_path):
    data = classification_data(tmp_path / "cls")
    results = run(backbone, data, tmp_path / "out", "--augmentation", "paper", "--epochs", "3", "--learning_rates", "0.01", "0.5")
    (result,) = results["results"]
    settings = result["settings"]
    assert settings["augmentation"].startswith("paper: RandomResizedCrop 32 (scale 0.08–1), horizontal flip")
    assert "held-out 0.1 of the training split" in settings["selection_rule"] and settings["num_train_examples"] == 43
    (metric,) = result["metrics"]
    assert metric["type"] == "accuracy" and 0 <= metric["value"] <= 100


@pytest.mark.parametrize(
    "make_data, flags, augmentation",
    [
        (segmentation_data, ["--task", "image-segmentation", "--label_column", "annotation", "--reduce_labels", "true"],
         "paper: RandomResizedCrop 32 (scale 0.7–1), horizontal flip, colour jitter"),
        (depth_data, ["--task", "depth-estimation", "--label_column", "depth"],
         "paper: random 0.8 square crop of the centre square resized to 32, horizontal flip, colour jitter"),
    ],
)  # fmt: skip
def test_augmented_dense_probes_end_to_end(backbone, tmp_path, make_data, flags, augmentation):
    data = make_data(tmp_path / "data")
    flags = [*flags, "--augmentation", "paper", "--epochs", "2", "--feature_cache_dir", str(tmp_path / "cache")]
    results = run(backbone, data, tmp_path / "out", *flags)
    (result,) = results["results"]
    assert result["settings"]["augmentation"].startswith(augmentation)
    assert all(math.isfinite(metric["value"]) for metric in result["metrics"])
    again = run(backbone, data, tmp_path / "again", *flags)  # test features from the cache this time
    assert again["results"][0]["metrics"] == result["metrics"]  # the augmentation draws depend on the seed only


def test_unknown_augmentation_is_one_line_on_the_command_line(backbone, tmp_path, monkeypatch, capsys):
    argv = ["evaluate.py", "--model_name_or_path", backbone, "--dataset_name", str(tmp_path / "missing"),
            "--output_dir", str(tmp_path / "out"), "--augmentation", "randaugment"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:  # checked before any dataset or model is loaded
        runpy.run_path(str(ROOT / "scripts" / "evaluate.py"), run_name="__main__")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert message.startswith("error: augmentation='randaugment' is not supported; expected one of ['none', 'paper']")


def test_two_processes_print_and_write_once_what_one_process_gets(backbone, tmp_path):
    """`accelerate launch --config_file accelerate_configs/cpu_2proc.yaml scripts/evaluate.py ...`, as
    tests/test_multiprocess.py launches distillation: two real ranks over gloo, nothing mocked. Each
    extracts half of the batches; the main process alone trains the heads, prints and writes."""
    import os
    import re
    import subprocess

    from test_multiprocess import CONFIG, _free_port

    data = classification_data(tmp_path / "cls")
    flags = ["--epochs", "5", "--learning_rates", "0.1", "0.5", "--extraction_batch_size", "8"]
    single = run(backbone, data, tmp_path / "one", *flags)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(CONFIG),
        "--main_process_port", str(_free_port()), str(ROOT / "scripts" / "evaluate.py"),
        "--model_name_or_path", backbone, "--dataset_name", data, "--output_dir", str(tmp_path / "two"),
        "--num_workers", "0", "--batch_size", "8", *flags,
    ]  # fmt: skip
    launch = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = launch.stdout + launch.stderr
    assert launch.returncode == 0, output[-3000:]
    assert launch.stdout.count("Linear probes of `") == 1 and launch.stdout.count("| image-classification |") == 1, launch.stdout
    assert re.search(r"\[train\]: 100%\|█+\| 3/3 ", output), output[-3000:]  # 6 batches of 8, 3 per rank
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["results"][0]["metrics"] == single["results"][0]["metrics"]  # all the features, in order
    assert two["results"][0]["settings"]["held_out_scores"] == single["results"][0]["settings"]["held_out_scores"]


@pytest.mark.parametrize("family", sorted(newer_families()))
def test_newer_families_are_probed_through_the_architecture_table(family, tmp_path):
    """Depth probes read both the summary (CLS/first summary token, or mean patch) and the patch grid,
    so a wrong prefix count or preprocessing would fail here."""
    teacher = newer_families()[family](tmp_path / family)
    data = depth_data(tmp_path / "depth")
    results = run(str(teacher), data, tmp_path / "out", "--task", "depth-estimation", "--label_column", "depth", "--epochs", "2")
    (result,) = results["results"]
    assert all(math.isfinite(metric["value"]) for metric in result["metrics"])
    summary = "CLS token" if family in ("dinov3_vit", "dinov3_vit_gated", "radio", "metaclip_2") else "mean patch token"
    assert results["backbone"]["feature"].startswith(f"patch tokens ⊕ {summary}")
