"""Where a run's files live, and the export of its students.

A run's output folder holds:

- the student, a plain Hugging Face model folder (`config.json`, `model.safetensors`,
  `preprocessor_config.json`, the card `README.md`) that `AutoModel.from_pretrained` loads without
  this package; with several students, one such folder per student, `<output_dir>/<student>/`
  (`check_not_group` refuses the group's folder where a student's is expected);
- in each student folder, `distillation/`: what trained beside the student — the teacher's SiNGER
  adapters in PEFT format, the method's heads (projectors, generators) with the teacher's
  target-normalisation statistics where its targets were normalised (`target_normalization.<block>.*`),
  the distillation config and the run record; with several teachers, one subfolder per teacher for
  its adapters and heads (`heads.load_teacher_heads` reads them back as teacher-like features);
- in each student folder, `artifacts/` (with `artifact_stats`): the final high-norm artifact
  statistics and the patch-norm figures of the teacher, refined teacher and student;
- the Trainer's own `checkpoint-N/` folders (the trainable state, optimizer, RNG, trainer state)
  and `trainer_state.json`; a checkpoint is complete once `FINGERPRINT_FILE` is in it.

The teacher is never written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file

from .locations import public_name
from .modeling import DistillationModel
from .numerics import NonFiniteLossError

DISTILLATION_DIR = "distillation"
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "distillation_config.json"
RUN_RECORD = "run_record.json"
"""Facts only the training script knows (teacher, data, training arguments, hardware), for the card."""
FINGERPRINT_FILE = "singer_run.json"
"""Written last into a checkpoint: what it shares with any run that may resume it."""
STREAM_STATE_FILE = "stream_state_rank{}.pt"
"""A checkpoint's streamed-data position (the stateful DataLoader's state), one per process."""
ARTIFACTS_DIR = "artifacts"
"""In a student folder: the run's final artifact statistics and figures (published with the student);
also the prefix of the logged artifact statistics."""
ARTIFACT_STATS_FILE = "artifact_stats.json"
ARTIFACT_FIGURES = ("patch_norms.png", "norm_histograms.png")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
NORMALIZATION_PREFIX = "target_normalization."
"""Keys of a teacher's target-normalisation statistics in `HEADS_FILE`: `target_normalization.<block>.<buffer>`."""


def student_dir(output_dir: str | Path, model: DistillationModel, student: str) -> Path:
    """The folder of `student`: the output folder itself, or its subfolder when there are several."""
    return Path(output_dir) if len(model.students) == 1 else Path(output_dir) / student


def check_not_group(folder: str | os.PathLike, argument: str) -> None:
    """Fails in one line when `folder` is the output folder of a run with several students (which holds
    one student folder each, not a student), naming them."""
    folder = Path(folder).expanduser()
    if not folder.is_dir() or (folder / "config.json").is_file():
        return
    students = sorted(path.name for path in folder.iterdir() if _trained_in_group(path))
    if students:
        raise ValueError(
            f"{argument}: {folder} holds the {len(students)} students of a group run ({', '.join(students)}), one folder "
            f"each; give one of them, e.g. {folder / students[0]}"
        )


def _trained_in_group(folder: Path) -> bool:
    """Whether `folder` holds a student whose run record says it was trained in a group."""
    record = folder / DISTILLATION_DIR / RUN_RECORD
    try:
        return (folder / "config.json").is_file() and "group" in json.loads(record.read_text())
    except (OSError, ValueError):
        return False


def distilled_teachers(summary: dict) -> dict[str | None, dict]:
    """Each teacher's part of a `distillation_config.json` (its blocks, and with several teachers its weight,
    normalisation and images) by name: `{None: summary}` for a student of one teacher."""
    teachers = summary.get("teachers")
    return dict(teachers) if isinstance(teachers, dict) and teachers else {None: summary}


def teacher_dir(distillation_dir: Path, model: DistillationModel, teacher: str) -> Path:
    """Where one teacher's adapters and heads go inside `distillation/`: itself, or a subfolder per teacher."""
    return distillation_dir if len(model.teachers) == 1 else distillation_dir / teacher


def export_students(model: DistillationModel, output_dir: str | Path, image_processor=None) -> list[Path]:
    """Write every student with its `distillation/` folder (see the module docstring); returns their folders.

    Refuses, before writing anything, a student whose weights are not finite.
    """
    for name, student in model.students.items():
        broken = [key for key, value in student.state_dict().items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if broken:
            raise NonFiniteLossError(f"student: non-finite weights in {broken[:3]}; not saved (the last checkpoint is intact)")
    folders = []
    for name, student in model.students.items():
        folder = student_dir(output_dir, model, name)
        folder.mkdir(parents=True, exist_ok=True)
        student.save_pretrained(folder, safe_serialization=True)
        if image_processor is not None:
            image_processor.save_pretrained(folder)
        write_distillation(model, name, folder / DISTILLATION_DIR)
        folders.append(folder)
    return folders


def write_distillation(model: DistillationModel, student: str, folder: Path) -> None:
    """`distillation/` of one student: adapters (PEFT format), heads, config, a README saying what they are."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model.configs[student]
    summary = config.to_dict()
    teachers = {}
    for teacher, method in model.methods[student].items():
        target = teacher_dir(folder, model, teacher)
        target.mkdir(parents=True, exist_ok=True)
        if method.adapter_config(config, method.teacher_layers) is not None:
            save_adapter(model.teachers[teacher], model.adapter_name(student), target)
        heads = dict(method.state_dict())
        for layer, normalization in model.target_normalizations[teacher].items() if teacher in model.target_normalizations else ():
            heads.update({f"{NORMALIZATION_PREFIX}{layer}.{key}": value for key, value in normalization.state_dict().items()})
        save_file({key: value.contiguous() for key, value in heads.items()}, str(target / HEADS_FILE))
        settings = model.teacher_settings[teacher]
        layers = {"teacher_layers": method.teacher_layers, "student_layers": method.student_layers}
        images = {key: getattr(settings, key) for key in ("image_mean", "image_std", "image_size") if getattr(settings, key) is not None}
        teachers[teacher] = {"weight": settings.weight, "normalization": settings.normalization, **images, **layers}
    if len(teachers) == 1:
        summary.update(next(iter(teachers.values())))
        summary.pop("weight")
        if summary["normalization"] == "none":
            summary.pop("normalization")
    else:
        summary["teachers"] = teachers
    (folder / CONFIG_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "README.md").write_text(distillation_readme(model, student))  # replaces PEFT's blank card


def save_adapter(teacher: peft.PeftModel, adapter_name: str, folder: Path) -> None:
    """One named adapter of `teacher`, saved as PEFT saves a "default" adapter (loadable with
    `PeftModel.from_pretrained(teacher, folder)`), its base model named without a local path."""
    with tempfile.TemporaryDirectory(dir=folder) as staging:
        teacher.save_pretrained(staging, selected_adapters=[adapter_name])
        saved = Path(staging) if adapter_name == "default" else Path(staging) / adapter_name  # PEFT's layout
        for name in ADAPTER_FILES:
            shutil.move(str(saved / name), str(folder / name))
    config_path = folder / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = public_name(adapter_config.get("base_model_name_or_path"))
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))


def distillation_readme(model: DistillationModel, student: str) -> str:
    lines = ["# Distillation artefacts", ""]
    for teacher, method in model.methods[student].items():
        pairs = ", ".join(f"teacher block {t} → student block {s}" for t, s in zip(method.teacher_layers, method.student_layers))
        where = "" if len(model.teachers) == 1 else f" (teacher `{teacher}`: `{teacher}/`)"
        lines.append(f"- {method.label}{where}: {pairs}; the heads are {method.heads_description}")
    lines += [
        "",
        "The student itself is the folder above.",
        "",
        f"- `{CONFIG_FILE}`: the method's settings and the teacher → student block mapping.",
        f"- `{HEADS_FILE}`: what trained beside the student to read it (see above); `singer_hf.load_teacher_heads`",
        "  turns the projectors into the student's estimate of the teacher's features:",
        "",
        "```python",
        "import singer_hf, transformers",
        'student = transformers.AutoModel.from_pretrained("<the student folder>")',
        'heads = singer_hf.load_teacher_heads("<the student folder>"' + ("" if len(model.teachers) == 1 else ', teacher="<name>"') + ")",
        "features = heads(student(pixel_values, output_hidden_states=True).hidden_states)  # {teacher block: B×N×D_teacher}",
        "```",
        "",
    ]
    if any(method.adapter_config(model.configs[student], method.teacher_layers) for method in model.methods[student].values()):
        lines += [
            "- `adapter_config.json`, `adapter_model.safetensors`: the teacher's SiNGER adapters, a PEFT adapter:",
            "",
            "```python",
            "import peft, singer_hf  # importing singer_hf registers the SINGER PEFT type",
            'teacher = peft.PeftModel.from_pretrained(teacher, "<this folder>")  # the same teacher as in training',
            "```",
        ]
    return "\n".join(lines) + "\n"
