"""Checkpoint safety: output folders are not clobbered, a checkpoint is resumed only by its own run.

- `check_output_dir` / `clear_previous_run`: a non-empty output folder is refused unless overwriting
  (which removes the earlier run's checkpoints and `distillation/` so nothing of it mixes with the
  new run) or resuming.
- `resolve_checkpoint`: `--resume_from_checkpoint true|PATH` to one complete checkpoint folder, or
  a one-line error. Checkpoints are written under a temporary name and renamed when complete
  (`SingerTrainer`), so a partial one never has the `checkpoint-N` name and is never picked.
- `run_fingerprint` / `check_fingerprint`: what a checkpoint must share with the run resuming it
  (method, layers, adapter shape, teacher and student architecture), saved in each checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .architectures import resolve_vit

FINGERPRINT_FILE = "singer_run.json"
STAGING_PREFIX = ".staging-"
"""Prefix of a checkpoint folder being written; renamed to `checkpoint-N` once complete."""
_RUN_ARTEFACTS = (PREFIX_CHECKPOINT_DIR + "-*", STAGING_PREFIX + "*", "distillation")


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """Refuses a non-empty `output_dir` unless `overwrite` or `resuming` (read-only: safe on every process)."""
    folder = Path(output_dir)
    if folder.is_dir() and any(folder.iterdir()) and not (overwrite or resuming):
        raise ValueError(
            f"output_dir: {folder.name} is not empty (an earlier run?); pass --overwrite_output_dir true to replace "
            "it, --resume_from_checkpoint true to continue it, or choose another folder"
        )


def clear_previous_run(output_dir: str) -> None:
    """Removes an earlier run's checkpoints and adapters, so none of them mixes with this run's (main process only)."""
    folder = Path(output_dir)
    for pattern in _RUN_ARTEFACTS:
        for path in folder.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def resolve_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from (`true`: the last complete one in `output_dir`), checked to be complete."""
    if resume_from_checkpoint in (None, False) or str(resume_from_checkpoint).lower() == "false":
        return None
    if str(resume_from_checkpoint).lower() == "true":
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(f"resume_from_checkpoint: true, but output_dir {Path(output_dir).name} holds no checkpoint-N folder")
        checkpoint = last
    else:
        checkpoint = resume_from_checkpoint
        if not os.path.isdir(checkpoint):
            raise ValueError(f"resume_from_checkpoint: {checkpoint} does not exist")
    missing = [name for name in ("trainer_state.json", "config.json", FINGERPRINT_FILE) if not os.path.isfile(os.path.join(checkpoint, name))]
    if missing:
        raise ValueError(f"resume_from_checkpoint: {Path(checkpoint).name} is not a complete singer_hf checkpoint (missing {missing})")
    return checkpoint


def publishable_name(name_or_path: str | None) -> str | None:
    """A Hub id as it is; a local path reduced to its folder's name (local absolute paths are never published)."""
    if not name_or_path or not (os.path.isabs(name_or_path) or os.path.exists(name_or_path)):
        return name_or_path
    return Path(name_or_path).resolve().name


def publish_adapter_files(folder: str, base_model_name_or_path: str | None) -> None:
    """PEFT writes the teacher's local path into adapter_config.json (`base_model_name_or_path`) and its
    README (`base_model` and a tag); rewrite both with the folder's name only. (Renaming before the save
    instead would make PEFT look the name up on the Hub.)"""
    public = publishable_name(base_model_name_or_path)
    if public == base_model_name_or_path:
        return
    config_path = Path(folder, "adapter_config.json")
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = public
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    readme = Path(folder, "README.md")
    if readme.is_file():
        readme.write_text(readme.read_text().replace(base_model_name_or_path, public))


def _architecture(model) -> dict:
    vit = resolve_vit(model)
    shapes = {name: list(value.shape) for name, value in vit.backbone.state_dict().items() if "singer_" not in name}
    return {
        "name": publishable_name(getattr(vit.backbone.config, "_name_or_path", None)),
        "model_type": vit.backbone.config.model_type,
        "depth": vit.depth,
        "width": vit.width,
        "image_size": vit.image_size,
        "patch_size": vit.patch_size,
        "shapes_sha256": hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16],
    }


def run_fingerprint(model) -> dict:
    """What a checkpoint shares with any run that may resume it (a `DistillationModel`)."""
    config = model.config
    return {
        "method": config.method,
        "teacher_layers": list(model.teacher_layers),
        "student_layers": list(model.student_layers),
        "rank": config.rank if model.adapters else None,
        "teacher": _architecture(model.teacher),
        "student": _architecture(model.student),
    }


def write_fingerprint(model, checkpoint: str) -> None:
    with open(os.path.join(checkpoint, FINGERPRINT_FILE), "w") as file:
        json.dump(run_fingerprint(model), file, indent=2)


def check_fingerprint(model, checkpoint: str) -> None:
    """Fails naming the checkpoint and every difference when it was written by another configuration."""
    saved = json.loads(Path(checkpoint, FINGERPRINT_FILE).read_text())
    current = run_fingerprint(model)
    differences = []
    for key, value in current.items():
        if isinstance(value, dict):
            differences += [f"{key}.{k} {saved.get(key, {}).get(k)!r} (checkpoint) vs {v!r} (now)" for k, v in value.items() if saved.get(key, {}).get(k) != v]
        elif saved.get(key) != value:
            differences.append(f"{key} {saved.get(key)!r} (checkpoint) vs {value!r} (now)")
    if differences:
        raise ValueError(
            f"resume_from_checkpoint: {Path(checkpoint).name} belongs to another configuration: {'; '.join(differences)}"
        )
