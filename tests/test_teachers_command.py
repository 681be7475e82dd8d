"""Several teachers through scripts/distill.py, as a user runs them (`--teachers FILE`): two teachers of
different families, image statistics and sizes distilled into one student, logged per teacher and term,
each teacher's files and card entry written, resumed bit for bit; one teacher given as a list trains as
the single-teacher path; mistakes in the list are one line each, before any weight is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import make_vit
from safetensors.torch import load_file
from standins import newer_families, vit_processor, write_images

from singer_hf import load_teacher_heads
from singer_hf.cli import UsageError
from singer_hf.methods import get_method

STUDENT = "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64"
TEACHERS = [
    {"name": "vit", "teacher_name_or_path": "vit", "layers": [3, 5], "normalization": "phi-s"},
    # Another family, another size (48 px: a 6×6 grid against the student's 4×4) and ImageNet statistics.
    {"name": "dino", "teacher_name_or_path": "dino", "weight": 0.5, "normalization": "phi-s"},
]
STEPS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    make_vit(seed=0).save_pretrained(root / "vit")
    vit_processor(32).save_pretrained(root / "vit")  # mean = std = 0.5
    newer_families(image=48)["dinov3_vit"](root / "dino")
    write_images(root / "data.parquet")
    teachers = [{**entry, "teacher_name_or_path": str(root / entry["teacher_name_or_path"])} for entry in TEACHERS]
    (root / "teachers.yaml").write_text(yaml.safe_dump(teachers))
    return root


def _argv(root: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--student_size", "tiny", "--student_config_overrides", STUDENT, "--rank", "4",
        "--dataset_name", str(root / "data.parquet"), "--output_dir", str(output), "--per_device_train_batch_size", "4",
        "--max_steps", str(STEPS), "--logging_steps", "1", "--seed", "0", "--disable_tqdm", "true",
        "--report_to", "none", "--artifact_stats", "false", *extra,
    ]  # fmt: skip


def _saved(folder: Path, teachers: list[str]) -> dict:
    """The student, and each teacher's heads (statistics included) and adapters, as saved."""
    weights = {f"student.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    for teacher in teachers:
        for name in ("heads.safetensors", "adapter_model.safetensors"):
            weights.update({f"{teacher}.{name}.{k}": v for k, v in load_file(folder / "distillation" / teacher / name).items()})
    return weights


@pytest.fixture(scope="module")
def run(distill, workspace, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "out"
    distill.main(_argv(workspace, output, "--teachers", str(workspace / "teachers.yaml"), "--save_steps", "2"))
    return output


def test_two_teachers_train_one_student_logged_per_teacher_and_term(run, workspace):
    terms = get_method("singer").loss_weights
    history = [entry for entry in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert len(history) == STEPS
    weights = {"vit": 1.0, "dino": 0.5}
    for entry in history:  # the loss is each teacher's SiNGER loss, weighted by the teacher's weight
        total = sum(weight * sum(term_weight * entry[f"loss/{teacher}/{term}"] for term, (_, term_weight) in terms.items())
                    for teacher, weight in weights.items())  # fmt: skip
        assert abs(entry["loss"] - total) < 1e-4 * entry["loss"], entry

    summary = json.loads((run / "distillation" / "distillation_config.json").read_text())
    dino = json.loads((workspace / "dino" / "preprocessor_config.json").read_text())
    assert summary["teachers"]["vit"]["teacher_layers"] == [3, 5]
    assert summary["teachers"]["dino"] | {"teacher_layers": None, "student_layers": None} == {
        "weight": 0.5, "normalization": "phi-s", "image_mean": dino["image_mean"], "image_std": dino["image_std"],
        "image_size": 48, "teacher_layers": None, "student_layers": None,
    }  # fmt: skip
    # The student reads the first teacher's images, and is saved with that processor.
    assert list(transformers.AutoImageProcessor.from_pretrained(run).image_mean) == [0.5, 0.5, 0.5]

    student = transformers.AutoModel.from_pretrained(run)
    hidden = student(pixel_values=torch.randn(2, 3, 32, 32), output_hidden_states=True).hidden_states
    for teacher, width in (("vit", 48), ("dino", 32)):
        features = load_teacher_heads(run, teacher)(hidden)
        assert list(features) == summary["teachers"][teacher]["teacher_layers"]
        assert all(value.shape[-1] == width and torch.isfinite(value).all() for value in features.values())

    record = json.loads((run / "distillation" / "run_record.json").read_text())
    assert [teacher["name"] for teacher in record["teachers"].values()] == ["vit", "dino"]
    card = (run / "README.md").read_text()
    assert "distilled from `vit` and `dino` with SiNGER" in card
    assert "| Teacher `dino` | `dino`: loss weight 0.5, KD targets normalised by PHI-S, images at 48 px |" in card
    assert "| `dino` | 5 | 3 | final |" in card


def test_two_teachers_resume_bit_for_bit_from_a_checkpoint(distill, workspace, run, tmp_path):
    resumed = tmp_path / "out"
    shutil.copytree(run / "checkpoint-2", resumed / "checkpoint-2")  # a run stopped after step 2
    distill.main(_argv(workspace, resumed, "--teachers", str(workspace / "teachers.yaml"), "--resume_from_checkpoint", "true"))
    expected, actual = _saved(run, ["vit", "dino"]), _saved(resumed, ["vit", "dino"])
    assert expected.keys() == actual.keys() and any(".target_normalization." in key for key in expected)
    differing = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not differing, differing[:3]


def test_one_teacher_given_as_a_list_trains_as_the_single_teacher_path(distill, workspace, tmp_path):
    (tmp_path / "one.yaml").write_text(yaml.safe_dump([{"name": "vit", "teacher_name_or_path": str(workspace / "vit"), "layers": [3, 5]}]))
    short = ["--max_steps", "2", "--save_strategy", "no"]
    distill.main(_argv(workspace, tmp_path / "list", "--teachers", str(tmp_path / "one.yaml"), *short))
    distill.main(_argv(workspace, tmp_path / "flag", "--teacher_name_or_path", str(workspace / "vit"), "--teacher_layers", "3", "5", *short))
    listed, flagged = load_file(tmp_path / "list" / "model.safetensors"), load_file(tmp_path / "flag" / "model.safetensors")
    assert listed.keys() == flagged.keys() and all(torch.equal(listed[key], flagged[key]) for key in listed)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda entries: entries + [dict(entries[0])], "teachers: two entries are named 'vit'; each teacher needs its own name"),
        (lambda entries: [entries[0], {**entries[1], "normalization": "pca"}],
         "teachers entry 'dino': normalization: must be one of ['none', 'phi-s'], got 'pca'"),
        (lambda entries: [entries[0], {**entries[1], "wieght": 2}], "wieght: unknown key in teachers entry 'dino'; did you mean 'weight'?"),
        (lambda entries: [entries[0], {**entries[1], "name": "distillation"}], "teachers: entry 2 needs a name of letters"),
        (lambda entries: [entries[0], {**entries[1], "layers": [5, 9]}], "teachers entry 'dino': layers: block 9 is out of range"),
        (lambda entries: [entries[0], {**entries[1], "image_processor_name_or_path": "{root}/odd"}], "teachers entry 'dino': teacher: "),
    ],
    ids=["duplicate-name", "normalization", "unknown-key", "reserved-name", "layers-out-of-range", "unmatched-grid"],
)  # fmt: skip
def test_a_mistake_in_the_teachers_is_one_line_before_any_weight_is_read(distill, workspace, tmp_path, monkeypatch, change, message):
    entries = yaml.safe_load((workspace / "teachers.yaml").read_text())
    transformers.ViTImageProcessor(size={"height": 44, "width": 44}).save_pretrained(tmp_path / "odd")  # 44 px: not a multiple of 8
    text = yaml.safe_dump(change(entries)).replace("{root}", str(tmp_path))
    (tmp_path / "teachers.yaml").write_text(text)
    loaded = []  # every model whose weights are read
    original = transformers.PreTrainedModel.from_pretrained.__func__
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a) or original(cls, *a, **k)))
    with pytest.raises(UsageError) as error:
        distill.main(_argv(workspace, tmp_path / "out", "--teachers", str(tmp_path / "teachers.yaml")))
    assert str(error.value).startswith(message) and "\n" not in str(error.value) and not loaded


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--teacher_name_or_path", "{root}/vit"], "teachers: give either --teacher_name_or_path (one teacher) or --teachers (several), not both"),
        (["--teacher_layers", "3", "5"], "teacher_layers: with several teachers, give each teacher's blocks as `layers` in its teachers entry"),
    ],
    ids=["both", "teacher-layers"],
)  # fmt: skip
def test_flags_that_contradict_the_teachers_are_refused_in_one_line(distill, workspace, tmp_path, flags, message):
    flags = [flag.replace("{root}", str(workspace)) for flag in flags]
    with pytest.raises(UsageError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        distill.check_command_line(_argv(workspace, tmp_path / "out", "--teachers", str(workspace / "teachers.yaml"), *flags))
    with pytest.raises(UsageError, match="^teacher_name_or_path: give the teacher"):
        distill.check_command_line(_argv(workspace, tmp_path / "out"))


def test_the_run_publishes_each_teachers_files_exports_and_is_diagnosed_per_teacher(run, workspace, tmp_path):
    from singer_hf.commands import diagnose
    from singer_hf.export import check_export_arguments
    from singer_hf.publishing import publish_student

    staged = publish_student(run, "me/student", dry_run=tmp_path / "upload", include_distillation=True)
    for teacher in ("vit", "dino"):
        assert {f"distillation/{teacher}/{name}" for name in ("heads.safetensors", "adapter_model.safetensors", "adapter_config.json")} <= set(staged.files)
    card = (tmp_path / "upload" / "README.md").read_text()
    assert 'subfolder="distillation/<teacher>"' in card and str(workspace) not in card
    assert check_export_arguments(run, tmp_path / "student.onnx")[1] == 3  # the deepest student block any teacher distils

    common = ["--dataset_name", str(workspace / "data.parquet"), "--run_dir", str(run), "--num_images", "4", "--figure_images", "2"]
    report = diagnose.main(["--model_name_or_path", str(workspace / "dino"), "--teacher", "dino", "--output_dir", str(tmp_path / "d"), *common])
    assert {"teacher block 5", "refined teacher block 5", "student block 3"} <= set(report["views"])
    with pytest.raises(ValueError, match=r"^teacher: the run learnt from several teachers; give the one model_name_or_path is, one of \['dino', 'vit'\]"):
        diagnose.main(["--model_name_or_path", str(workspace / "dino"), "--output_dir", str(tmp_path / "e"), *common])
