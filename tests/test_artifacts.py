"""Artifact statistics while training: logged through scripts/distill.py (trainer state and
tensorboard), equal to the diagnostics' statistics of the same features, and the run's figures,
card table and published files."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import datasets
import peft
import pytest
import torch
import transformers
from conftest import IMAGE, make_vit
from safetensors.torch import load_file
from standins import write_images
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from singer_hf.artifacts import STATISTICS, VIEWS, ArtifactViews, norm_statistics, patch_norms
from singer_hf.data import ImageTransform, PixelNormalizer, build_transforms, image_processor_stats
from singer_hf.diagnostics import artifact_stats
from singer_hf.publishing import publish_student

ROOT = Path(__file__).resolve().parents[1]
STUDENT = "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64"
LAYERS = (4, 5)  # SiNGER's default for a 6-block teacher
ARTIFACT_PATCH = 5
EVAL_IMAGES = 8


def teacher_with_artifact():
    """A tiny ViT whose patch token `ARTIFACT_PATCH` carries a large vector in its position embedding: a
    high-norm token in every image and every block's output (the residual stream keeps it)."""
    teacher = make_vit(seed=0)
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(teacher.config.hidden_size, generator=torch.Generator().manual_seed(3)), dim=0)
        teacher.embeddings.position_embeddings[0, 1 + ARTIFACT_PATCH] += 40 * direction
    return teacher


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def run(distill, tmp_path_factory, monkeypatch_module):
    """One SiNGER run of 4 steps, evaluated at its last step on 8 images in one batch, logged to tensorboard."""
    root = tmp_path_factory.mktemp("artifacts")
    teacher_with_artifact().save_pretrained(root / "teacher")
    transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(root / "teacher")
    write_images(root / "data.parquet", count=24)
    output = root / "student"
    monkeypatch_module.setenv("TENSORBOARD_LOGGING_DIR", str(root / "logs"))  # transformers' tensorboard callback
    argv = [
        "--teacher_name_or_path", str(root / "teacher"), "--student_size", "tiny", "--student_config_overrides", STUDENT,
        "--dataset_name", str(root / "data.parquet"), "--output_dir", str(output), "--per_device_train_batch_size", "8",
        "--rank", "4", "--max_steps", "4", "--logging_steps", "2", "--save_strategy", "no", "--disable_tqdm", "true",
        "--eval_split", "train", "--max_eval_samples", str(EVAL_IMAGES), "--per_device_eval_batch_size", str(EVAL_IMAGES),
        "--eval_strategy", "steps", "--eval_steps", "4", "--report_to", "tensorboard",
    ]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        distill.main(argv)
    (root / "printed.txt").write_text(printed.getvalue())
    return root, output


def test_statistics_are_logged_to_trainer_state_and_tensorboard(run):
    root, output = run
    # The console shows the losses, not the dozens of statistics (per view, block and statistic).
    printed = (root / "printed.txt").read_text()
    assert "'loss_kd'" in printed and "'eval_loss'" in printed and "artifacts/" not in printed
    logs = json.loads((output / "trainer_state.json").read_text())["log_history"]
    keys = {f"artifacts/{view}/{layer}/{stat}" for view in VIEWS for layer in LAYERS for stat in STATISTICS}
    train_logs = [entry for entry in logs if "loss" in entry]
    assert len(train_logs) == 2 and all(keys <= set(entry) for entry in train_logs)
    evaluation = next(entry for entry in logs if "eval_loss" in entry)
    assert {f"eval_{key}" for key in keys} <= set(evaluation)
    # The planted token: 1 of the 16 patches of every image is far above 4× the median in the raw teacher.
    assert all(entry[f"artifacts/teacher/{layer}/outlier_share"] == pytest.approx(1 / 16) for entry in train_logs for layer in LAYERS)

    events = EventAccumulator(str(root / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{key}" for key in keys} <= tags and {f"eval/{key}" for key in keys} <= tags
    logged = [event.value for event in events.Scalars("train/artifacts/refined_teacher/5/max_median")]
    assert logged == pytest.approx([entry["artifacts/refined_teacher/5/max_median"] for entry in train_logs])


def test_logged_statistics_equal_the_diagnostics_of_the_same_features(run):
    """The eval log (final weights, one batch of the first 8 images) recomputed here from the saved run:
    the teacher's hidden states, its SiNGER adapters refining them, the student's through its saved
    projectors, summarised by `diagnostics.artifact_stats`."""
    root, output = run
    logs = json.loads((output / "trainer_state.json").read_text())["log_history"]
    evaluation = next(entry for entry in logs if "eval_loss" in entry)
    processor = transformers.AutoImageProcessor.from_pretrained(output)
    mean, std, size = image_processor_stats(processor)
    transform = ImageTransform(build_transforms(mean, std, size, train=False, normalize=False), "image")
    rows = datasets.load_dataset("parquet", data_files=str(root / "data.parquet"), split="train").select(range(EVAL_IMAGES))
    rows = rows.cast_column("image", datasets.Image(decode=False))
    pixels = PixelNormalizer(mean, std)(torch.stack(transform({"image": rows["image"]})["pixel_values"]))

    teacher = transformers.AutoModel.from_pretrained(root / "teacher").eval()
    student = transformers.AutoModel.from_pretrained(output).eval()
    config = json.loads((output / "distillation" / "distillation_config.json").read_text())
    heads = load_file(output / "distillation" / "heads.safetensors")
    with torch.no_grad():
        teacher_states = teacher(pixel_values=pixels, output_hidden_states=True).hidden_states
        student_states = student(pixel_values=pixels, output_hidden_states=True).hidden_states
        adapters = peft.PeftModel.from_pretrained(teacher, str(output / "distillation")).base_model.singer_layers
        for index, (layer, student_layer) in enumerate(zip(config["teacher_layers"], config["student_layers"])):
            raw = teacher_states[layer + 1]
            features = {
                "teacher": raw,
                "refined_teacher": adapters[layer].refine(raw),
                "student": torch.nn.functional.linear(
                    student_states[student_layer + 1], heads[f"projectors.{index}.weight"], heads[f"projectors.{index}.bias"]
                ),
            }
            for view, feature in features.items():
                expected = artifact_stats(feature, prefix_tokens=1)
                norms = feature[:, 1:].norm(dim=-1)
                p99 = (torch.quantile(norms, 0.99, dim=1) / norms.median(dim=1).values).mean().item()
                key = f"eval_artifacts/{view}/{layer}"
                assert evaluation[f"{key}/outlier_share"] == pytest.approx(expected["outlier_share"], abs=1e-6), key
                assert evaluation[f"{key}/max_median"] == pytest.approx(expected["max_median_ratio"]["mean"], rel=1e-4), key
                assert evaluation[f"{key}/p99_median"] == pytest.approx(p99, rel=1e-4), key
    assert evaluation["eval_artifacts/teacher/5/outlier_share"] == pytest.approx(1 / 16)


def test_figures_card_table_and_published_files(run, tmp_path):
    root, output = run
    folder = output / "artifacts"
    assert all((folder / name).stat().st_size > 1000 for name in ("patch_norms.png", "norm_histograms.png"))
    stats = json.loads((folder / "artifact_stats.json").read_text())
    assert stats["figure_images"] == "the first 4 images of the evaluation split"
    assert [(layer["teacher_block"], sorted(layer["views"])) for layer in stats["layers"]] == [(layer, sorted(VIEWS)) for layer in LAYERS]
    last = [entry for entry in json.loads((output / "trainer_state.json").read_text())["log_history"] if "loss" in entry][-1]
    assert stats["layers"][1]["views"]["student"]["p99_median"] == last["artifacts/student/5/p99_median"]

    card = (output / "README.md").read_text()
    section = card[card.index("## Artifacts") :]
    share = 100 * last["artifacts/teacher/4/outlier_share"]
    assert f"| 4 → {stats['layers'][0]['student_block']} | teacher, block 4 | {share:.2f} % |" in section
    assert "refined teacher, block 5" in section and "student (projected), block" in section
    assert "![patch norms](artifacts/patch_norms.png)" in section and "![norm histograms](artifacts/norm_histograms.png)" in section

    published = publish_student(output, "user/student", dry_run=tmp_path / "staged")
    assert {"artifacts/patch_norms.png", "artifacts/norm_histograms.png", "artifacts/artifact_stats.json"} <= set(published.files)
    assert "## Artifacts" in (tmp_path / "staged" / "README.md").read_text()


def test_switched_off(distill, run, tmp_path):
    root, _ = run
    output = tmp_path / "student"
    distill.main([
        "--teacher_name_or_path", str(root / "teacher"), "--student_size", "tiny", "--student_config_overrides", STUDENT,
        "--dataset_name", str(root / "data.parquet"), "--output_dir", str(output), "--per_device_train_batch_size", "8",
        "--rank", "4", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
        "--report_to", "none", "--method", "fitnet", "--artifact_stats", "false",
    ])  # fmt: skip
    logs = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert not any(key.startswith("artifacts/") for entry in logs for key in entry)
    assert not (output / "artifacts").exists() and "## Artifacts" not in (output / "README.md").read_text()


def test_views_share_the_diagnostics_outlier_definition():
    """`ArtifactViews` batch means are `norm_statistics` of `patch_norms`, the functions diagnostics uses."""
    features = torch.randn(3, 17, 8)
    features[0, 4] *= 30
    views = ArtifactViews()
    views.add("teacher", 2, features, 1)
    views.add("student", 2, features * 2, 1)
    stats = views.statistics()
    expected = artifact_stats(features, 1)
    assert stats["teacher/2/outlier_share"].item() == pytest.approx(expected["outlier_share"])
    assert stats["student/2/max_median"].item() == pytest.approx(expected["max_median_ratio"]["mean"])
    assert stats["teacher/2/p99_median"].item() == pytest.approx(norm_statistics(patch_norms(features, 1))["p99_median"].mean().item())


def test_history_figure_script(run, tmp_path):
    """The README's command: the logged statistics over training, one panel per distilled block."""
    _, output = run
    spec = importlib.util.spec_from_file_location("plot_artifact_history", ROOT / "scripts" / "plot_artifact_history.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up while being created
    spec.loader.exec_module(script)
    figure = script.main(["--run_dir", str(output), "--output", str(tmp_path / "history.png"), "--statistics", "outlier_share", "max_median"])
    assert figure.stat().st_size > 1000
    with pytest.raises(ValueError, match="statistics: each must be one of"):
        script.main(["--run_dir", str(output), "--output", str(tmp_path / "x.png"), "--statistics", "median"])


def test_keys_name_students_and_teachers_like_the_loss_terms(images):
    """Two students, two teachers: pair views under `<student>/<teacher>/`, each teacher's own view under
    its name alone (every student sees the same one); nothing is computed with the statistics off."""
    from singer_hf import DistillationModel, DistillationModelConfig, TeacherSettings

    teachers = {"big": make_vit(seed=0), "other": make_vit(seed=1)}
    students = {"a": make_vit(hidden=32, layers=4, seed=2), "b": make_vit(hidden=32, layers=4, seed=3)}
    configs = {"a": DistillationModelConfig(rank=4), "b": DistillationModelConfig(method="fitnet")}
    settings = {name: TeacherSettings(layers=[3, 5]) for name in teachers}
    model = DistillationModel(teachers, students, configs, teacher_settings=settings)
    output = model(images, artifact_stats=True)
    expected = {f"{t}/teacher/{layer}/{stat}" for t in teachers for layer in (3, 5) for stat in STATISTICS}
    expected |= {f"{s}/{t}/{view}/{layer}/{stat}" for s in students for t in teachers for layer in (3, 5) for stat in STATISTICS
                 for view in (("refined_teacher", "student") if s == "a" else ("student",))}  # fmt: skip
    assert set(output.artifacts) == expected
    assert {key.rsplit("/", 1)[0] for key in output.losses} == {f"{s}/{t}" for s in students for t in teachers} | set(students)
    assert model(images).artifacts is None
