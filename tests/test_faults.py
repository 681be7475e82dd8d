"""Fault injection on scripts/distill.py: clobbered outputs, foreign checkpoints, kills, bad data, non-finite losses."""

import importlib.util
import io
import json
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import transformers
from conftest import IMAGE, make_vit

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "distill.py"
STUDENT = "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64"


@pytest.fixture(scope="module")
def distill():
    spec = importlib.util.spec_from_file_location("distill_faults", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _png(pixels: np.ndarray, mode: str = "RGB", **save) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).convert(mode).save(buffer, format="PNG", **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_vit(seed=0).save_pretrained(root / "teacher")
    transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(root / "teacher")
    rng = np.random.default_rng(0)
    images = [{"bytes": _png(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)), "path": None} for _ in range(32)]
    data = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    data.to_parquet(str(root / "data.parquet"))
    return root


def _argv(root: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--teacher_name_or_path", str(root / "teacher"), "--student_size", "tiny",
        "--student_config_overrides", STUDENT, "--dataset_name", str(root / "data.parquet"),
        "--output_dir", str(output), "--per_device_train_batch_size", "4", "--rank", "4",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", *extra,
    ]  # fmt: skip


def test_outputs_are_never_silently_clobbered(distill, workspace, tmp_path):
    output = tmp_path / "run"
    distill.main(_argv(workspace, output, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"))
    assert (output / "checkpoint-2" / "singer_run.json").is_file()
    assert (output / "distillation" / "adapter_model.safetensors").is_file()
    before = (output / "model.safetensors").read_bytes()

    with pytest.raises(ValueError, match="output_dir: run is not empty"):
        distill.main(_argv(workspace, output, "--max_steps", "2", "--method", "fitnet"))
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: checkpoint-2 belongs to another configuration: "
                                         r"method 'singer' \(checkpoint\) vs 'fitnet' \(now\)"):
        distill.main(_argv(workspace, output, "--max_steps", "3", "--method", "fitnet", "--resume_from_checkpoint", "true"))
    assert (output / "model.safetensors").read_bytes() == before  # the refused runs wrote nothing

    distill.main(_argv(workspace, output, "--max_steps", "2", "--method", "fitnet", "--overwrite_output_dir", "true", "--save_strategy", "no"))
    assert not list(output.glob("checkpoint-*")), "the earlier run's checkpoints survived an overwrite"
    assert not (output / "distillation" / "adapter_model.safetensors").exists(), "SiNGER adapters beside a FitNet run"
    assert json.loads((output / "distillation" / "distillation_config.json").read_text())["method"] == "fitnet"
