"""scripts/distill.py end to end on a tiny teacher and a local Parquet dataset."""

import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
import yaml
from conftest import IMAGE, PATCH, make_vit

STUDENT = "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher = make_vit(seed=0)
    teacher.save_pretrained(root / "teacher")
    transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(root / "teacher")
    rng = np.random.default_rng(0)
    images = []
    for index in range(48):
        buffer = io.BytesIO()
        mode = ("RGB", "L", "RGBA")[index % 3]
        PIL.Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert(mode).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    images[5] = {"bytes": b"not an image", "path": None}  # undecodable: skipped and counted, not a crash
    data = datasets.Dataset.from_dict({"img": images, "label": list(range(48))}).cast_column("img", datasets.Image())
    data.to_parquet(str(root / "data.parquet"))
    return root


def _argv(workspace, output, *extra):
    return [
        "--teacher_name_or_path", str(workspace / "teacher"), "--student_size", "tiny",
        "--student_config_overrides", STUDENT, "--dataset_name", str(workspace / "data.parquet"),
        "--image_column", "img", "--output_dir", str(output), "--per_device_train_batch_size", "8",
        "--rank", "4", "--logging_steps", "2", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("streaming", [True, False])
def test_distill_script_end_to_end(distill, workspace, tmp_path, streaming, caplog):
    output = tmp_path / "student"
    flags = ["--streaming", "true", "--max_steps", "4", "--shuffle_buffer", "5000"] if streaming else ["--num_train_epochs", "1"]
    with caplog.at_level(logging.INFO):
        result = distill.main(_argv(workspace, output, *flags))
    # The shuffle buffer's memory is stated at start: 5,000 examples × ~110 KB in the one (main-process) reader.
    assert ("shuffle buffer: 5,000 encoded examples in each of 1 DataLoader worker(s) of each process; ~0.6 GB" in caplog.text) == streaming
    assert result["metrics"]["train_runtime"] > 0
    assert {"loss_kd", "loss_outlier", "loss_info"} <= set(result["losses"])
    logs = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert max(entry.get("skipped_images", 0) for entry in logs) == 1  # the corrupt image, counted once
    student = transformers.AutoModel.from_pretrained(output)
    assert student.config.hidden_size == 32 and student.config.image_size == IMAGE
    card = (output / "README.md").read_text()
    assert "singer" in card and str(workspace) not in card  # no local absolute paths in the card
    # The student is named by its shape after the overrides, not by --student_size.
    assert "Student: ViT (4 blocks, width 32) from scratch, 32px" in caplog.text and "| Student | ViT (4 blocks, width 32) from scratch |" in card
    assert "than its teacher" not in caplog.text
    assert (output / "distillation" / "adapter_model.safetensors").is_file()


def test_config_file_and_overrides(distill, workspace, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: fitnet\nteacher_layers: [1, 5]\nrank: 4\nkd_weight: 3.0\ndataset_name: {workspace / 'data.parquet'}\n")
    model_args, data_args, training_args = distill.parse_arguments(
        [str(recipe), "--teacher_name_or_path", "t", "--student_size", "tiny", "--output_dir", str(tmp_path), "--kd_weight", "5"]
    )
    config = training_args.distillation_config()
    assert (config.method, config.teacher_layers, config.kd_weight) == ("fitnet", [1, 5], 5.0)
    assert training_args.lr_scheduler_type == "cosine_with_min_lr" and training_args.learning_rate == 1e-3


def test_teacher_student_resolution_mismatch(distill, workspace, tmp_path):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                    image_size=2 * IMAGE, patch_size=PATCH)
    torch.manual_seed(0)
    transformers.ViTModel(config).save_pretrained(tmp_path / "student")
    argv = _argv(workspace, tmp_path / "out", "--max_steps", "1")
    argv[argv.index("--student_size") : argv.index("--student_size") + 4] = ["--student_name_or_path", str(tmp_path / "student")]
    with pytest.raises(ValueError, match="student_name_or_path: the student is built for 64px images but the teacher.s image processor gives 32px"):
        distill.main(argv)


def test_timm_teacher_end_to_end(distill, workspace, tmp_path):
    """The paper's teachers are timm checkpoints: AutoModel gives a TimmWrapperModel, and the
    image processor keeps its statistics in timm's data_config."""
    # A timm checkpoint keeps its preprocessing in config.json's pretrained_cfg.
    pretrained_cfg = dict(input_size=(3, IMAGE, IMAGE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)
    transformers.TimmWrapperModel(
        transformers.TimmWrapperConfig(
            architecture="vit_tiny_patch16_224",
            pretrained_cfg=pretrained_cfg,
            model_args=dict(img_size=IMAGE, patch_size=PATCH, embed_dim=48, depth=6, num_heads=2),
        )
    ).save_pretrained(tmp_path / "timm_teacher")
    argv = _argv(workspace, tmp_path / "out", "--max_steps", "2")
    argv[argv.index(str(workspace / "teacher"))] = str(tmp_path / "timm_teacher")
    result = distill.main(argv)
    assert {"loss_kd", "loss_outlier", "loss_info"} <= set(result["losses"])
    assert transformers.AutoModel.from_pretrained(tmp_path / "out").config.image_size == IMAGE
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert list(processor.image_std) == [0.25] * 3 and processor.size["height"] == IMAGE


def test_resume_from_the_last_checkpoint(distill, workspace, tmp_path):
    output = tmp_path / "student"
    argv = _argv(workspace, output, "--max_steps", "2")
    argv[argv.index("--save_strategy") + 1] = "steps"
    distill.main([*argv, "--save_steps", "2"])
    checkpoint_state = output / "checkpoint-2" / "trainer_state.json"
    state = json.loads(checkpoint_state.read_text())
    state["log_history"].insert(0, {"step": 0, "marker": "from checkpoint-2"})  # only a resumed run carries it on
    checkpoint_state.write_text(json.dumps(state))
    distill.main([*argv, "--max_steps", "3", "--resume_from_checkpoint", "true"])
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["log_history"][0].get("marker") == "from checkpoint-2"


def test_a_student_larger_than_its_teacher_is_warned_and_named_by_its_shape(distill, workspace, tmp_path, caplog):
    """--student_size tiny with overrides making it deeper and wider than the 6-block, 48-wide teacher."""
    argv = _argv(workspace, tmp_path / "student", "--max_steps", "1")
    argv[argv.index(STUDENT)] = "hidden_size=64,num_hidden_layers=8,num_attention_heads=2,intermediate_size=128"
    with caplog.at_level(logging.INFO):
        distill.main(argv)
    warnings = [record.getMessage() for record in caplog.records if record.name == "singer_hf.distill" and record.levelno == logging.WARNING]
    assert warnings == [
        "student: ViT (8 blocks, width 64) from scratch is deeper (8 vs 6 blocks) and wider (width 64 vs 48) than its "
        "teacher; a distilled student is usually smaller"
    ]
    assert "Student: ViT (8 blocks, width 64) from scratch, 32px" in caplog.text and "ViT-tiny" not in caplog.text
    card = (tmp_path / "student" / "README.md").read_text()
    assert "| Student | ViT (8 blocks, width 64) from scratch |" in card


@pytest.mark.parametrize("native_bf16", [False, True])
def test_a_paper_recipe_on_a_cpu_keeps_bf16_only_where_the_cpu_has_it(distill, tmp_path, monkeypatch, caplog, native_bf16):
    """A GPU recipe (bf16, 8 DataLoader workers) on a CPU: fp32 where bf16 would be emulated (~10x slower), and
    no more workers than the cores this process may use, each said in one line."""
    import singer_hf.hardware

    monkeypatch.setattr(singer_hf.hardware, "native_cpu_bf16", lambda: native_bf16)  # this machine's CPU is one of the two
    recipe = Path(__file__).resolve().parent.parent / "configs" / "vit_l_to_vit_t_singer.yaml"
    assert yaml.safe_load(recipe.read_text())["bf16"] is True
    cores = singer_hf.hardware.usable_cores()
    with caplog.at_level(logging.WARNING, logger="singer_hf"):
        _, _, args = distill.parse_arguments(
            [str(recipe), "--output_dir", str(tmp_path), "--use_cpu", "true", "--dataloader_num_workers", str(cores + 6)]
        )
    assert args.bf16 is native_bf16 and args.dataloader_num_workers == cores
    lines = [record.getMessage() for record in caplog.records]
    assert lines[-1] == f"dataloader_num_workers: {cores + 6}, but this process may use {cores} CPU core(s) (os.sched_getaffinity); using {cores}"
    assert lines[:-1] == ([] if native_bf16 else [
        "bf16: this CPU has no native bf16 (no amx_bf16 / avx512_bf16 / bf16 in /proc/cpuinfo), where bf16 runs ~10x "
        "slower than fp32; training in fp32"
    ])  # fmt: skip
