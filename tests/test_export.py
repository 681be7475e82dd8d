"""scripts/export_onnx.py on students that scripts/distill.py wrote (ViT from scratch, DINOv2 and timm
started from a folder), run with onnxruntime on CPU and compared with PyTorch on the same images."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import datasets
import numpy as np
import onnxruntime
import pytest
import torch
import transformers
from standins import TINY, cropping_processor, hf_families, save_hf, save_timm, write_images

from singer_hf import resolve_vit
from singer_hf.cli import run_cli

FP32_TOLERANCE = 1e-5  # max |ONNX − PyTorch| / max |PyTorch|, per output (measured: ~5e-7)
FP16_TOLERANCE = 1e-2  # a float16 graph against PyTorch float32 (measured: ~6e-4)


@pytest.fixture(scope="module")
def export_onnx():
    from singer_hf.commands import export_onnx

    return export_onnx


@pytest.fixture(scope="module")
def runs(distill, tmp_path_factory):
    """Output folders of scripts/distill.py, one per student family, after 1 step on a 4-block ViT teacher.
    The ViT student has the teacher's depth, so its deepest distilled block is not its last (12 → 12's quirk)."""
    root = tmp_path_factory.mktemp("export")
    images = write_images(root / "train.parquet", count=8)
    hf_families(layers=4)["vit"](root / "teacher")
    save_hf(root / "dinov2_start", transformers.Dinov2Model,
            transformers.Dinov2Config(**TINY, num_hidden_layers=2, image_size=32, patch_size=8), cropping_processor(36, 32))  # fmt: skip
    save_timm(root / "timm_start", "vit_tiny_patch16_224", depth=2, embed_dim=32)
    students = {
        "vit": ["--student_size", "tiny", "--student_config_overrides",
                "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64"],
        "dinov2": ["--student_name_or_path", str(root / "dinov2_start")],
        "timm_wrapper": ["--student_name_or_path", str(root / "timm_start")],
    }  # fmt: skip
    for family, student in students.items():
        distill.main([
            "--teacher_name_or_path", str(root / "teacher"), *student, "--dataset_name", str(images),
            "--output_dir", str(root / family), "--teacher_layers", "1", "3", "--max_steps", "1", "--rank", "4",
            "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        ])  # fmt: skip
    return root


def _images(run: Path, count: int) -> torch.Tensor:
    """`count` of the training images through the student's own image processor."""
    data = datasets.load_dataset("parquet", data_files=str(run.parent / "train.parquet"), split="train")
    processor = transformers.AutoImageProcessor.from_pretrained(run)
    return processor(images=[image.convert("RGB") for image in data[:count]["image"]], return_tensors="pt")["pixel_values"]


def _pytorch(run: Path, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each output as docs/publishing.md defines it: features = hidden_states[student_layers[-1] + 1] (a timm model's
    hidden states are prefix-free maps, so its token features come from the architecture table)."""
    block = json.loads((run / "distillation" / "distillation_config.json").read_text())["student_layers"][-1]
    model = transformers.AutoModel.from_pretrained(run).eval()
    timm = model.config.model_type == "timm_wrapper"
    with torch.no_grad():
        output = model(pixel_values=pixel_values, output_hidden_states=not timm)
        features = resolve_vit(model).block_outputs(pixel_values, block)[-1] if timm else output.hidden_states[block + 1]
    return {"features": features, "pooled_features": features[:, 0], "last_hidden_state": output.last_hidden_state}


def _check_parity(path: Path, run: Path, names: list[str], tolerance: float) -> dict[str, tuple[float, float]]:
    """Batches of 1 and 3 (the graph was traced at 2): finite, within `tolerance` of PyTorch float32.
    Returns, per output, the largest (max |ONNX − PyTorch|, that / max |PyTorch|) of the two batches."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "pixel_values" and isinstance(graph_input.shape[0], str)  # a symbolic batch axis
    assert [output.name for output in session.get_outputs()] == names
    dtype = np.float16 if graph_input.type == "tensor(float16)" else np.float32
    worst = dict.fromkeys(names, (0.0, 0.0))
    for count in (1, 3):
        pixel_values = _images(run, count)
        references = _pytorch(run, pixel_values)
        for name, result in zip(names, session.run(None, {"pixel_values": pixel_values.numpy().astype(dtype)})):
            result, reference = torch.from_numpy(result).float(), references[name]
            assert result.shape == reference.shape and torch.isfinite(result).all(), name
            difference = (result - reference).abs().max().item()
            worst[name] = max(worst[name], (difference, difference / reference.abs().max().item()), key=lambda pair: pair[1])
    assert max(relative for _, relative in worst.values()) < tolerance, worst
    return worst


def test_vit_student_exports_with_the_model_cards_command(export_onnx, runs, tmp_path, monkeypatch, capsys):
    """The card's command and onnxruntime snippet, as written, from a folder holding `student` and `example.jpg`."""
    card = (runs / "vit" / "README.md").read_text()
    section = card.split("### Export to ONNX", 1)[1].split("\n## ", 1)[0]
    command = next(line for line in section.splitlines() if line.startswith("python scripts/export_onnx.py"))
    snippet = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "student").symlink_to(runs / "vit")
    datasets.load_dataset("parquet", data_files=str(runs / "train.parquet"), split="train")[0]["image"].save("example.jpg")

    export_onnx.main(shlex.split(command)[2:])
    assert "features: max |onnxruntime - PyTorch float32| = " in capsys.readouterr().out
    namespace = {}
    exec(snippet, namespace)  # noqa: S102 - the card's own code
    reference = _pytorch(runs / "vit", torch.from_numpy(namespace["inputs"]["pixel_values"]))["features"]
    assert np.abs(namespace["features"] - reference.numpy()).max() <= FP32_TOLERANCE * reference.abs().max().item()
    # 4 blocks, deepest distilled block 2: the graph stops there (no block 3, no final norm).
    assert json.loads((runs / "vit" / "distillation" / "distillation_config.json").read_text())["student_layers"][-1] == 2
    print(_check_parity(tmp_path / "student-onnx" / "model.onnx", runs / "vit", ["features"], FP32_TOLERANCE))


def test_dinov2_student_exports_every_output(export_onnx, runs, tmp_path):
    names = ["features", "pooled_features", "last_hidden_state"]
    exported = export_onnx.main(["--student_dir", str(runs / "dinov2"), "--output", str(tmp_path / "onnx"), "--outputs", *names])
    assert exported.path == tmp_path / "onnx" / "model.onnx" and (tmp_path / "onnx" / "preprocessor_config.json").is_file()
    print(_check_parity(exported.path, runs / "dinov2", names, FP32_TOLERANCE))


def test_timm_student_exports_in_float16_without_overflow(export_onnx, runs, tmp_path):
    names = ["features", "pooled_features"]
    path = tmp_path / "student_fp16.onnx"
    export_onnx.main(["--student_dir", str(runs / "timm_wrapper"), "--output", str(path), "--dtype", "float16", "--outputs", *names])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student_fp16.onnx"]  # a named file: nothing beside it
    print(_check_parity(path, runs / "timm_wrapper", names, FP16_TOLERANCE))
    # Token values of several hundred, as in high-norm artifact tokens: their squares exceed float16's
    # range, so a LayerNorm computed in float16 returns Inf/NaN; the exported one accumulates in float32.
    pixel_values = 1000 * _images(runs / "timm_wrapper", 3)
    reference = _pytorch(runs / "timm_wrapper", pixel_values)["features"]
    assert reference.abs().max() ** 2 > torch.finfo(torch.float16).max
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    features = torch.from_numpy(session.run(["features"], {"pixel_values": pixel_values.half().numpy()})[0]).float()
    assert torch.isfinite(features).all()
    assert (features - reference).abs().max() < FP16_TOLERANCE * reference.abs().max()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--student_dir", "{root}/teacher"], "student_dir: teacher has no distillation/distillation_config.json"),
        (["--student_dir", "{root}/dinov2_start"], "student_dir: dinov2_start has no distillation/distillation_config.json"),
        (["--student_dir", "{root}/missing"], "student_dir: {root}/missing is not a folder"),
        (["--student_dir", "{root}"], "student_dir: {name} holds no config.json"),
        (["--output", "{root}/train.parquet/student.onnx"], "output: cannot write to {root}/train.parquet"),
        (["--feature_block", "9"], "feature_block: block 9 is out of range for a 4-block vit"),
        (["--outputs", "features", "pooler_output"], "outputs: give one or more distinct names of features, pooled_features"),
        (["--opset", "13"], "opset: the dynamo exporter writes opsets 18..23, got 13"),
        (["--dtype", "bfloat16"], "argument --dtype: invalid choice: 'bfloat16' (choose from 'float32', 'float16')"),
    ],
    ids=["teacher", "plain_model", "missing", "no_config", "unwritable", "feature_block", "outputs", "opset", "dtype"],
)
def test_bad_input_is_one_line_naming_the_argument(export_onnx, runs, tmp_path, capsys, flags, message):
    flags = [flag.format(root=runs) for flag in flags]
    defaults = {"--student_dir": str(runs / "vit"), "--output": str(tmp_path / "out.onnx")}
    argv = [token for key, value in defaults.items() if key not in flags for token in (key, value)] + flags
    with pytest.raises(SystemExit) as exit_status:
        run_cli(export_onnx.main, argv)
    error = capsys.readouterr().err
    assert exit_status.value.code == 2 and error.count("\n") == 1
    assert error.startswith(f"error: {message.format(root=runs, name=runs.name)}"), error
    assert not (tmp_path / "out.onnx").exists()


def test_an_existing_file_is_kept_unless_overwrite(export_onnx, runs, tmp_path, capsys):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an earlier export")
    with pytest.raises(SystemExit):
        run_cli(export_onnx.main, ["--student_dir", str(runs / "vit"), "--output", str(tmp_path)])
    assert capsys.readouterr().err.startswith(f"error: output: {path} exists; pass --overwrite true")
    assert path.read_bytes() == b"an earlier export"
