"""Checkpoint safety: output folders are not clobbered, a checkpoint is resumed only by its own run.

- `check_output_dir` / `clear_previous_run`: a non-empty output folder is refused unless overwriting
  (which removes the earlier run's checkpoints and results so nothing of it mixes with the new run)
  or resuming.
- `resolve_checkpoint`: `--resume_from_checkpoint true|PATH` to one complete checkpoint folder, or
  a one-line error. A checkpoint is complete once its fingerprint is written, after everything else
  (`callbacks.CheckpointCallback`); one cut short by a kill is never picked.
- `run_fingerprint` / `check_fingerprint`: what a checkpoint must share with the run resuming it
  (methods, layers, adapter shapes, teacher and student architectures).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .architectures import resolve_vit
from .layout import DISTILLATION_DIR, FINGERPRINT_FILE
from .locations import public_name

_RUN_ARTEFACTS = (PREFIX_CHECKPOINT_DIR + "-*", DISTILLATION_DIR)


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """Refuses a non-empty `output_dir` unless `overwrite` or `resuming` (read-only: safe on every process)."""
    folder = Path(output_dir)
    if folder.is_dir() and any(folder.iterdir()) and not (overwrite or resuming):
        raise ValueError(
            f"output_dir: {folder.name} is not empty (an earlier run?); pass --overwrite_output_dir true to replace "
            "it, --resume_from_checkpoint true to continue it, or choose another folder"
        )


def clear_previous_run(output_dir: str) -> None:
    """Removes an earlier run's checkpoints and results, so none of them mixes with this run's (main process only)."""
    folder = Path(output_dir)
    for pattern in _RUN_ARTEFACTS:
        for path in folder.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def checkpoints(output_dir: str | Path) -> dict[int, Path]:
    """The run's checkpoint folders by step, complete or not."""
    found = Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
    return {int(path.name.rpartition("-")[2]): path for path in found if path.is_dir() and path.name.rpartition("-")[2].isdigit()}


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / FINGERPRINT_FILE).is_file() and (checkpoint / TRAINER_STATE_NAME).is_file()


def remove_incomplete_checkpoints(output_dir: str | Path) -> None:
    """Checkpoints a kill cut short are removed before a resumed run writes its own (main process only)."""
    for checkpoint in checkpoints(output_dir).values():
        if not is_complete(checkpoint):
            shutil.rmtree(checkpoint)


def resolve_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from (`true`: the last complete one in `output_dir`), checked to be complete."""
    if resume_from_checkpoint in (None, False) or str(resume_from_checkpoint).lower() == "false":
        return None
    if str(resume_from_checkpoint).lower() == "true":
        complete = [path for _, path in sorted(checkpoints(output_dir).items()) if is_complete(path)]
        if not complete:
            raise ValueError(f"resume_from_checkpoint: true, but output_dir {Path(output_dir).name} holds no complete checkpoint-N folder")
        return str(complete[-1])
    checkpoint = Path(resume_from_checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} does not exist")
    if not is_complete(checkpoint):
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint.name} is not a complete singer_hf checkpoint "
            f"(no {FINGERPRINT_FILE} or {TRAINER_STATE_NAME}: cut short, or written by something else)"
        )
    return str(checkpoint)


def _architecture(model) -> dict:
    vit = resolve_vit(model)
    shapes = {name: list(value.shape) for name, value in vit.backbone.state_dict().items() if "singer_" not in name}
    return {
        "name": public_name(getattr(vit.backbone.config, "_name_or_path", None)),
        "model_type": vit.backbone.config.model_type,
        "depth": vit.depth,
        "width": vit.width,
        "image_size": vit.image_size,
        "patch_size": vit.patch_size,
        "shapes_sha256": hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16],
    }


def run_fingerprint(model) -> dict:
    """What a checkpoint shares with any run that may resume it (a `DistillationModel`): each pair's
    method, layers, adapter rank and target normalisation (where there is one), and the architecture of every teacher and student."""
    pairs = {}
    for pair in model.pairs:
        config = model.configs[pair.student]
        pairs[f"{pair.student}/{pair.teacher}"] = {
            "method": pair.method.name,
            "teacher_layers": list(pair.teacher_layers),
            "student_layers": list(pair.student_layers),
            "rank": config.rank if pair.method.adapter_config(config, pair.teacher_layers) else None,
        }
        if (normalization := model.teacher_settings[pair.teacher].normalization) != "none":
            pairs[f"{pair.student}/{pair.teacher}"]["normalization"] = normalization
    if len(pairs) == 1:
        return {**next(iter(pairs.values())), "teacher": _architecture(model.teacher), "student": _architecture(model.student)}
    return {
        "pairs": pairs,
        "teachers": {name: _architecture(teacher) for name, teacher in model.teachers.items()},
        "students": {name: _architecture(student) for name, student in model.students.items()},
    }


def check_fingerprint(model, checkpoint: str) -> None:
    """Fails naming the checkpoint and every difference when it was written by another configuration."""
    saved = json.loads(Path(checkpoint, FINGERPRINT_FILE).read_text())
    differences = _differences(saved, run_fingerprint(model), [])
    if differences:
        raise ValueError(
            f"resume_from_checkpoint: {Path(checkpoint).name} belongs to another configuration: {'; '.join(differences)}"
        )


def _differences(saved, current, where: list[str]) -> list[str]:
    if isinstance(current, dict) and isinstance(saved, dict):
        keys = [*current, *(key for key in saved if key not in current)]
        return [item for key in keys for item in _differences(saved.get(key), current.get(key), [*where, str(key)])]
    return [] if saved == current else [f"{'.'.join(where)} {saved!r} (checkpoint) vs {current!r} (now)"]
