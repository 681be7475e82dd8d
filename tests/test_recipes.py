"""Every shipped recipe (`configs/*.yaml`, new ones included) runs through scripts/distill.py with its
own settings, as a user runs it.

A recipe with a `students:` list trains them together; each student's folder, logs and card are checked.
A recipe with a `teachers:` list distils all of them into its student, each teacher swapped for its stand-in.

Swapped, because it cannot exist offline or on 2 CPU cores: the teacher (a tiny checkpoint of the same
family, depth, prefix tokens, MLP and patch size, so the recipe's `teacher_layers` hold; see tests/standins.py), the
dataset (local Parquet with the recipe's image column, streamed as the recipe says), `output_dir`, and
the step count and batch size. Everything else is the recipe's: method, layers, loss weights,
schedule, `max_grad_norm`, bf16 (fp32 on a CPU without native bf16), `report_to`, logging and saving, workers
(capped at the cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import pytest
import torch
import transformers
import yaml
from singer_hf.layout import distilled_teachers
from singer_hf.methods import get_method
from standins import hub_teacher, save_hf, save_timm, vit_processor, write_images

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def _stand_in_teacher(recipe: dict, folder: Path) -> Path:
    hub_id = recipe.get("teacher_name_or_path")
    if hub_id is None:  # configs/demo.yaml: scripts/demo.py trains its teacher, with this configuration
        from singer_hf.demo.teacher import teacher_config

        config = teacher_config(3, {0: "a", 1: "b", 2: "c"})
        return save_hf(folder, transformers.ViTForImageClassification, config, vit_processor(config.image_size))
    if hub_id.startswith("timm/"):
        return save_timm(folder, hub_id.removeprefix("timm/").split(".")[0])
    if hub_teacher(hub_id, folder) is not None:
        return folder
    pytest.fail(f"no offline stand-in for the teacher {hub_id!r}: add its family to tests/test_recipes.py")


def test_every_recipe_is_tested():
    assert len(RECIPES) >= 9 and all(path.suffix == ".yaml" for path in RECIPES)


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_runs_with_its_own_settings(distill, recipe_path, tmp_path, caplog, capsys):
    recipe = yaml.safe_load(recipe_path.read_text())
    if "teachers" in recipe:  # each teacher of the list swapped for its stand-in, the rest of its entry kept
        teachers = [{**entry, "teacher_name_or_path": str(_stand_in_teacher(entry, tmp_path / entry["name"]))} for entry in recipe["teachers"]]
        (tmp_path / "teachers.yaml").write_text(yaml.safe_dump(teachers))
        models = ["--teachers", str(tmp_path / "teachers.yaml")]
    else:
        models = ["--teacher_name_or_path", str(_stand_in_teacher(recipe, tmp_path / "teacher"))]
    data = write_images(tmp_path / "train.parquet", column=recipe.get("image_column", "image"))
    output = tmp_path / "run"
    argv = [
        str(recipe_path), *models, "--dataset_name", str(data),
        "--output_dir", str(output), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--artifact_stats", "false",  # the end-of-run figures (seconds of matplotlib per run): tests/test_artifacts.py
    ]  # fmt: skip
    with caplog.at_level("INFO", logger="singer_hf.distill"):
        result = distill.main(argv)
    assert result["metrics"]["train_runtime"] > 0
    # A recipe's students: its `students:` list (one folder each), or the recipe itself (the output folder).
    students = {entry["name"]: {**recipe, **entry} for entry in recipe["students"]} if "students" in recipe else {None: recipe}
    # What the run says and writes is each student's method's, not SiNGER's for every method.
    singer = any(student["method"] == "singer" for student in students.values())
    if "students" in recipe:
        labels = ", ".join(f"{name} ({get_method(student['method']).label})" for name, student in students.items())
        assert f"Distillation of {len(students)} students from one teacher pass: {labels}" in caplog.text
    else:
        several = f" from {len(recipe['teachers'])} teachers" if "teachers" in recipe else ""
        assert f"{get_method(recipe['method']).label} distillation{several}" in caplog.text
    assert ("adapter on block" in caplog.text) == singer and ("adapters" in capsys.readouterr().out) == singer
    if "tensorboard" in str(recipe.get("report_to")):
        events = list(output.rglob("events.out.tfevents.*"))
        assert events, "report_to tensorboard wrote no event file"
    # The recipes log every 50 steps or more: only the final metrics are logged in these 2 steps (per-term logs: test_students).
    logged = [entry for entry in json.loads((output / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    image = PIL.Image.new("RGB", (50, 40), (120, 30, 200))
    for name, settings in students.items():
        folder = output if name is None else output / name
        singer = settings["method"] == "singer"
        research = (folder / "distillation" / "README.md").read_text()
        assert "More Information Needed" not in research and ("PeftModel.from_pretrained" in research) == singer

        summary = json.loads((folder / "distillation" / "distillation_config.json").read_text())
        assert summary["method"] == settings["method"]
        # Each teacher's blocks, weight and normalisation as its entry says; its files in a subfolder of its own.
        parts = distilled_teachers(summary)
        for entry in recipe.get("teachers", [{"name": None, "layers": settings.get("teacher_layers")}]):
            part = parts[entry["name"]]
            if entry["layers"] is not None:
                assert part["teacher_layers"] == entry["layers"]
            if entry["name"] is not None:
                assert (part["weight"], part["normalization"]) == (entry["weight"], entry["normalization"])
                assert (folder / "distillation" / entry["name"] / "heads.safetensors").is_file()
        adapters = "distillation/*/adapter_model.safetensors" if len(parts) > 1 else "distillation/adapter_model.safetensors"
        assert len(list(folder.glob(adapters))) == (len(parts) if singer else 0)
        terms = get_method(settings["method"]).loss_weights
        if len(parts) > 1:
            keys = ["/".join(filter(None, ["loss", name, teacher, term])) for teacher in parts for term in terms]
        else:
            keys = [f"loss/{name}/{term}" if name else f"loss_{term}" for term in terms]
        assert all(key in entry for key in keys for entry in logged), logged

        # What the model card tells a user to do, on the published folder.
        student = transformers.AutoModel.from_pretrained(folder)
        processor = transformers.AutoImageProcessor.from_pretrained(folder)
        with torch.no_grad():
            hidden = student(**processor(images=image, return_tensors="pt"), output_hidden_states=True).hidden_states
        feature = hidden[max(part["student_layers"][-1] for part in parts.values()) + 1]
        assert feature.shape[-1] == student.config.hidden_size and torch.isfinite(feature).all()
        assert ("Trained in a group" in (folder / "README.md").read_text()) == (name is not None)
