"""Several students through scripts/distill.py, as a user runs them (`--students FILE`): each trains in
the group exactly as alone (per-student gradient clipping included), the group resumes bit for bit from
a checkpoint, and every student is logged per term (trainer_state.json, tensorboard)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import transformers
import yaml
from conftest import IMAGE, make_vit
from safetensors.torch import load_file

from singer_hf.callbacks import StudentClippingCallback

STUDENT = "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64"
# One student per method, one of them wider; what an entry leaves out (the model, the seed of the adapters)
# it takes from the run.
WIDER = "hidden_size=48,num_hidden_layers=4,num_attention_heads=2,intermediate_size=96"
GROUP = [
    {"name": "singer", "rank": 4},
    {"name": "fitnet", "method": "fitnet", "student_size": "tiny", "student_config_overrides": WIDER},
    {"name": "vitkd", "method": "vitkd"},
]
MAX_GRAD_NORM = 1e-3  # far below any of the students' gradient norms: every step clips each student
STEPS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import io

    import PIL.Image

    root = tmp_path_factory.mktemp("students")
    make_vit(seed=0).save_pretrained(root / "teacher")
    transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(root / "teacher")
    rng = np.random.default_rng(0)
    images = []
    for _ in range(32):
        png = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png, format="PNG")
        images.append({"bytes": png.getvalue(), "path": None})
    datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image()).to_parquet(str(root / "data.parquet"))
    (root / "students.yaml").write_text(yaml.safe_dump(GROUP))
    return root


def _argv(root: Path, output: Path, *extra: str) -> list[str]:
    # Random crops and flips of random pixels, AdamW, clipping on: any difference in data, order or update shows.
    return [
        "--teacher_name_or_path", str(root / "teacher"), "--student_size", "tiny", "--student_config_overrides", STUDENT,
        "--dataset_name", str(root / "data.parquet"), "--output_dir", str(output), "--per_device_train_batch_size", "4",
        "--max_steps", str(STEPS), "--max_grad_norm", str(MAX_GRAD_NORM), "--logging_steps", "1", "--seed", "0",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def _final_weights(folder: Path) -> dict:
    """A student folder's student, heads and (SiNGER) adapters, as saved."""
    weights = {f"student.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    weights.update({f"heads.{k}": v for k, v in load_file(folder / "distillation" / "heads.safetensors").items()})
    if (folder / "distillation" / "adapter_model.safetensors").is_file():
        weights.update({f"adapters.{k}": v for k, v in load_file(folder / "distillation" / "adapter_model.safetensors").items()})
    return weights


def _entry_flags(argv: list[str], entry: dict) -> list[str]:
    """`argv` run as the entry's student alone: its fields as flags (replacing the run's own)."""
    argv = list(argv)
    for key, value in entry.items():
        if key == "name":
            continue
        if f"--{key}" in argv:
            argv[argv.index(f"--{key}") + 1] = str(value)
        else:
            argv += [f"--{key}", str(value)]
    return argv


@pytest.fixture(scope="module")
def group_run(distill, workspace, tmp_path_factory):
    """The group trained uninterrupted (checkpoints every 2 steps, tensorboard on), and each student's clipping norms."""
    norms = []
    original = StudentClippingCallback.on_pre_optimizer_step

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        norms.append({name: float(norm) for name, norm in self.norms.items()})

    StudentClippingCallback.on_pre_optimizer_step = recording
    try:
        output = tmp_path_factory.mktemp("group") / "run"
        distill.main(_argv(workspace, output, "--students", str(workspace / "students.yaml"), "--save_steps", "2", "--report_to", "tensorboard"))
    finally:
        StudentClippingCallback.on_pre_optimizer_step = original
    return output, norms


def test_each_student_trains_in_the_group_exactly_as_alone_with_its_own_clipping(distill, workspace, group_run, tmp_path):
    output, norms = group_run
    # Clipping was on for every student at every step, each by its own norm (one norm over the group
    # would scale each student's update by the group's, not by its own).
    assert len(norms) == STEPS and all(set(step) == {e["name"] for e in GROUP} for step in norms)
    assert all(norm > 10 * MAX_GRAD_NORM for step in norms for norm in step.values()), norms
    for entry in GROUP:
        alone = tmp_path / entry["name"]
        distill.main(_entry_flags(_argv(workspace, alone, "--report_to", "none", "--save_strategy", "no"), entry))
        expected, actual = _final_weights(alone), _final_weights(output / entry["name"])
        assert expected.keys() == actual.keys()
        assert json.loads((alone / "distillation" / "distillation_config.json").read_text()) == json.loads(
            (output / entry["name"] / "distillation" / "distillation_config.json").read_text()
        )
        differing = [key for key in expected if not (expected[key] == actual[key]).all()]
        assert not differing, f"{entry['name']}: {len(differing)} tensors differ from the student trained alone, e.g. {differing[:3]}"


def test_the_group_resumes_bit_for_bit_from_a_checkpoint(distill, workspace, group_run, tmp_path):
    output, _ = group_run
    resumed = tmp_path / "run"
    shutil.copytree(output / "checkpoint-2", resumed / "checkpoint-2")  # a run stopped after step 2
    distill.main(_argv(workspace, resumed, "--students", str(workspace / "students.yaml"), "--report_to", "none",
                       "--save_steps", "2", "--resume_from_checkpoint", "true"))  # fmt: skip
    for entry in GROUP:
        expected, actual = _final_weights(output / entry["name"]), _final_weights(resumed / entry["name"])
        assert expected.keys() == actual.keys()
        assert all(torch_equal(expected[key], actual[key]) for key in expected), entry["name"]

    # Another group (one student fewer) does not resume from that checkpoint.
    other = [entry for entry in GROUP if entry["name"] != "vitkd"]
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    again = tmp_path / "again"
    shutil.copytree(output / "checkpoint-2", again / "checkpoint-2")
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: checkpoint-2 belongs to another configuration: .*vitkd"):
        distill.main(_argv(workspace, again, "--students", str(tmp_path / "other.yaml"), "--report_to", "none",
                           "--resume_from_checkpoint", "true"))  # fmt: skip


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_each_student_and_term_is_logged_and_each_folder_is_a_student(group_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from singer_hf.methods import get_method

    output, _ = group_run
    terms = {entry["name"]: [*get_method(entry.get("method", "singer")).loss_weights, "total"] for entry in GROUP}
    keys = {f"loss/{name}/{term}" for name, student_terms in terms.items() for term in student_terms}
    history = [entry for entry in json.loads((output / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert len(history) == STEPS and all(keys <= set(entry) for entry in history)
    for entry in history:  # the logged loss is the students' totals summed
        assert abs(entry["loss"] - sum(entry[f"loss/{name}/total"] for name in terms)) < 1e-4 * entry["loss"]
    (run_dir,) = {path.parent for path in output.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {f"train/{key}" for key in keys} <= set(events.Tags()["scalars"])

    for entry in GROUP:  # one plain student folder each, its card naming its method and the group
        folder = output / entry["name"]
        student = transformers.AutoModel.from_pretrained(folder)
        assert student.config.num_hidden_layers == 4
        card = (folder / "README.md").read_text()
        method = get_method(entry.get("method", "singer")).label
        others = ", ".join(f"`{other['name']}`" for other in GROUP if other is not entry)
        assert f"| Method | {method} (`method: {entry.get('method', 'singer')}`) |" in card
        assert f"| Trained in a group | one of 3 students distilled together from one teacher pass (the others: {others}) |" in card
        assert f"| Optimisation steps | {STEPS} |" in card  # read from the run's trainer_state.json, a folder up


def test_a_students_folder_is_published_and_exported_and_the_groups_folder_is_refused(group_run, tmp_path):
    from singer_hf.export import check_export_arguments
    from singer_hf.publishing import publish_student

    output, _ = group_run
    staged = publish_student(output / "fitnet", "me/fitnet", dry_run=tmp_path / "upload")
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(staged.files)
    assert f"| Optimisation steps | {STEPS} |" in (tmp_path / "upload" / "README.md").read_text()
    assert check_export_arguments(output / "vitkd", tmp_path / "vitkd.onnx")[1] == 3  # its deepest distilled block
    names = ", ".join(sorted(entry["name"] for entry in GROUP))
    for call in (lambda: publish_student(output, "me/x", dry_run=tmp_path / "again"), lambda: check_export_arguments(output, tmp_path / "x.onnx")):
        with pytest.raises(ValueError, match=f"holds the 3 students of a group run \\({names}\\), one folder each; give one of them"):
            call()
