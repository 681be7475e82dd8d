"""The model card (README.md) of a distilled student, rendered from the run's own records.

`write_student_card` renders `model_cards/student.md` (package data of `singer_hf`, a Jinja template
in the format `huggingface_hub.ModelCard.from_template` expects) from explicit facts;
`record_run` keeps the facts that only the training script knows (teacher, data, training
arguments, hardware) in `distillation/run_record.json`, and `student_card_from_run` renders the card
of a finished run from that record, `distillation/distillation_config.json`, `trainer_state.json`
and, when given, the evaluation's results.json files and figures.

Nothing private goes into the card: a local teacher or dataset appears by its folder name only (no
absolute paths, no home directory), and keys that look like secrets (`*token*`, `*password*`,
`*secret*`, `*api_key*`) and token-like strings are dropped from the configuration shown.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from safetensors import safe_open
from transformers.trainer import TRAINER_STATE_NAME

from .fields import MethodFields, RunFields, TrainingDefaults
from .artifacts import VIEWS
from .layout import ARTIFACT_FIGURES, ARTIFACT_STATS_FILE, ARTIFACTS_DIR, CONFIG_FILE, DISTILLATION_DIR, RUN_RECORD, distilled_teachers
from .locations import hub_id, public_name, without_local_paths
from .methods import METHODS, get_method
from .modeling import DistillationModelConfig

TEMPLATE_PATH = Path(__file__).resolve().parent / "model_cards" / "student.md"
"""The student card template (package data: installed with the wheel)."""

TAGS = ["singer", "knowledge-distillation", "vision-transformer", "image-feature-extraction"]
PIPELINE_TAG = "image-feature-extraction"

BIBTEX = """\
@inproceedings{yu2026singer,
    title={SiNGER: A Clearer Voice Distills Vision Transformers Further},
    author={Yu, Geunhyeok and Jeong, Sunjae and Choi, Yoonyoung and Kim, Jaeseung and Hwang, Hyoseok},
    booktitle={The Fourteenth International Conference on Learning Representations},
    year={2026},
    url={https://openreview.net/forum?id=exjrxVc2yT}
}"""

FAMILY_LABELS = {"vit": "ViT", "deit": "DeiT", "dinov2": "DINOv2", "dinov2_with_registers": "DINOv2 (with registers)",
                 "clip_vision_model": "CLIP vision", "siglip_vision_model": "SigLIP vision", "timm_wrapper": "timm ViT"}  # fmt: skip

# Training settings shown first, in this order, when `training` holds them (e.g. `args.to_dict()`).
TRAINING_KEYS = (
    "max_steps",
    "num_train_epochs",
    "global_batch_size",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "max_grad_norm",
    "bf16",
    "fp16",
    "seed",
)
_NOT_SHOWN = {"output_dir", "logging_dir"}  # local bookkeeping, whichever transformers version wrote them
_SECRET_KEY = re.compile(r"token|password|secret|api_?key", re.IGNORECASE)
_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def write_student_card(
    output_dir: str | os.PathLike,
    *,
    teacher_name: str | Mapping[str, str],
    dataset_name: str,
    distillation: dict,
    training: dict | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    template_path: str | os.PathLike | None = None,
    trainer_state: dict | None = None,
    hardware: dict | None = None,
    results: dict | None = None,
    baseline_results: list[dict] | tuple[dict, ...] = (),
    figures: list[str] | tuple[str, ...] = (),
    distillation_included: bool = True,
) -> ModelCard:
    """Write `output_dir/README.md`, a model card for the student saved there, and return it.

    Args:
        output_dir: the student folder (`FeatureDistillationTrainer.save_model`'s output); created if missing.
            Its `config.json`, when present, gives the student's depth.
        teacher_name: the teacher's Hub id or local path (a local path is shown by its folder name); for a
            student of several teachers, each teacher's by its name (the keys of `distillation["teachers"]`).
        dataset_name: the training data's Hub id or local path (same rule).
        distillation: the contents of `distillation/distillation_config.json` as `FeatureDistillationTrainer`
            writes them: the `DistillationModelConfig` fields plus the resolved `teacher_layers` and
            `student_layers`.
        training: optional training settings, e.g. `training_args.to_dict()` (only the usual
            optimisation settings of a `TrainingArguments` dict are shown) or a small dict of your own
            (shown in full, e.g. `{"global_batch_size": 512}`).
        license: the card's `license` metadata, shown in its body too; left out by default, since the
            student's terms follow its teacher's and its data's, which are not ours to assert.
        repo_id: the Hub repo the card's usage example loads; default: the folder's name.
        template_path: another Jinja template; default `model_cards/student.md` (package data).
        trainer_state: the run's `trainer_state.json`: steps, epochs and wall time of the budget.
        hardware: `record_run`'s description of the machines (processes, device, precision).
        results: the student's results.json (scripts/evaluate.py): the results table and the
            card's `model-index`.
        baseline_results: results.json files of the teacher and of baselines: more columns of the
            results table (not in `model-index`, which describes this model only).
        figures: image paths relative to the card (e.g. `figures/norms.png`), shown in the card.
        distillation_included: whether the folder the card describes holds `distillation/` (a
            published student holds it only when asked); the card describes that folder if so.
    """
    names = teacher_name if isinstance(teacher_name, Mapping) else {None: teacher_name}
    teachers = {key: dict(zip(("name", "hub_id"), _source(name))) for key, name in names.items()}
    return _render(
        Path(output_dir),
        teachers=teachers,
        dataset=_source(dataset_name),
        dataset_license=None,
        distillation=distillation,
        training=_scrub(dict(training or {})),
        license=license,
        repo_id=repo_id,
        template_path=template_path,
        trainer_state=trainer_state,
        hardware=hardware,
        results=results,
        baseline_results=baseline_results,
        figures=figures,
        distillation_included=distillation_included,
        student_dir=Path(output_dir),
    )


def record_run(
    output_dir: str | os.PathLike,
    *,
    teacher_name: str | Mapping[str, str],
    dataset_name: str,
    training_args,
    student: str | None = None,
    group: dict | None = None,
) -> dict:
    """Keep what only the training script knows, for cards rendered later (`student_card_from_run`).

    Writes `distillation/run_record.json`: the teacher (`teacher_name`: its Hub id or path, or each of several
    by its name) and the data (a local path by its folder name only, with the `license` their own cards
    declare, when a card is at hand), the student as the
    script describes it (e.g. "ViT (4 blocks, width 64) from scratch"), the training arguments
    (scrubbed like the card) and the hardware; for a student trained in a group, `group`: its name and
    the names of the group's students (its folder is then a subfolder of the run's). Returns the record.
    """
    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    device = training_args.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    training = {k: v for k, v in _scrub(training_args.to_dict()).items() if k not in _NOT_SHOWN}
    if group:  # each student's method settings are its distillation_config.json's, not the run's arguments'
        training = {k: v for k, v in training.items() if k not in MethodFields.__dataclass_fields__}
    def source(name: str) -> dict:
        return {**dict(zip(("name", "hub_id"), _source(name))), "license": card_license(name)}

    several = isinstance(teacher_name, Mapping) and len(teacher_name) > 1
    if isinstance(teacher_name, Mapping) and not several:
        (teacher_name,) = teacher_name.values()
    record = {
        **({"teachers": {key: source(name) for key, name in teacher_name.items()}} if several else {"teacher": source(teacher_name)}),
        "dataset": {**dict(zip(("name", "hub_id"), _source(dataset_name))), "license": card_license(dataset_name, "dataset")},
        "student": _scrub(student),
        "training": training,
        "hardware": {"num_processes": training_args.world_size, "device": device_name, "precision": precision},
    }
    if group:
        record["group"] = {"name": group["name"], "students": list(group["students"])}
    folder = Path(output_dir) / DISTILLATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def student_card_from_run(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    results: dict | None = None,
    baseline_results: list[dict] | tuple[dict, ...] = (),
    figures: list[str] | tuple[str, ...] = (),
    distillation_included: bool = True,
) -> ModelCard:
    """Render the card of a finished run from its records (see the module doc) into `output_dir`.

    `output_dir` defaults to `run_dir` (another folder: e.g. a copy of the student for upload).
    """
    run_dir = Path(run_dir)
    research_dir = run_dir / DISTILLATION_DIR
    record = _read_json(research_dir / RUN_RECORD, "run_dir", "a run record (written by scripts/distill.py)")
    distillation = _read_json(research_dir / CONFIG_FILE, "run_dir", "the distillation config")
    state_file = trainer_state_file(run_dir, record)
    trainer_state = _read_json(state_file, "run_dir", "the trainer state") if state_file.is_file() else None
    return _render(
        Path(output_dir) if output_dir is not None else run_dir,
        teachers=record["teachers"] if "teachers" in record else {None: record["teacher"]},
        dataset=(record["dataset"]["name"], record["dataset"]["hub_id"]),
        dataset_license=record["dataset"].get("license"),
        distillation=distillation,
        training=record["training"],
        license=license,
        repo_id=repo_id,
        template_path=None,
        trainer_state=trainer_state,
        hardware=record["hardware"],
        results=results,
        baseline_results=baseline_results,
        figures=figures,
        distillation_included=distillation_included,
        student_dir=run_dir,
        student=record.get("student"),
        group=record.get("group"),
    )


def trainer_state_file(run_dir: Path, record: dict) -> Path:
    """The `trainer_state.json` of the run that trained the student in `run_dir` (`record`: its run record):
    in the folder itself, or, for a student trained in a group, in the run's folder above it."""
    return (run_dir.parent if record.get("group") else run_dir) / TRAINER_STATE_NAME


def _render(
    output_dir: Path,
    *,
    teachers: dict[str | None, dict],
    dataset: tuple[str, str | None],
    dataset_license: str | None,
    distillation: dict,
    training: dict,
    license: str | None,
    repo_id: str | None,
    template_path: str | os.PathLike | None,
    trainer_state: dict | None,
    hardware: dict | None,
    results: dict | None,
    baseline_results: list[dict] | tuple[dict, ...],
    figures: list[str] | tuple[str, ...],
    distillation_included: bool,
    student_dir: Path,
    student: str | None = None,
    group: dict | None = None,
) -> ModelCard:
    """`teachers`: each teacher's {name, hub_id, license} by its name in the run (None for one teacher)."""
    dataset, dataset_hub = dataset
    model_name = public_name(str(output_dir)) if repo_id is None else repo_id.split("/")[-1]
    student_config = _student_config(student_dir)
    student_depth = student_config.get("num_hidden_layers") if isinstance(student_config.get("num_hidden_layers"), int) else None
    has_pooler = any(re.match(r"(.+\.)?pooler\.", name) for name in _weight_names(student_dir))

    distillation = _scrub(dict(distillation))
    method = distillation.get("method", "singer")
    if method not in METHODS:
        raise ValueError(f"distillation: unknown method {method!r}; expected one of {sorted(METHODS)}")
    method_class = get_method(method)
    parts = distilled_teachers(distillation)
    if set(parts) != set(teachers):
        raise ValueError(f"distillation: its teachers {sorted(map(str, parts))} differ from the run record's {sorted(map(str, teachers))}")
    known = {f.name for f in fields(DistillationModelConfig)}
    config = DistillationModelConfig(**{k: v for k, v in distillation.items() if k in known})
    final_role, other_role = method_class.final_role, method_class.other_role
    teacher_rows = []
    for key, part in parts.items():
        teacher_layers, student_layers = part.get("teacher_layers"), part.get("student_layers")
        if not teacher_layers or not student_layers or len(teacher_layers) != len(student_layers):
            raise ValueError(
                "distillation: needs `teacher_layers` and `student_layers` of the same length"
                + ("" if key is None else f" for teacher {key!r}") + " as in "
                f"distillation/distillation_config.json; got {teacher_layers!r} and {student_layers!r}"
            )
        source = teachers[key]
        teacher_rows.append({
            "key": key, "name": source["name"], "is_hub": source.get("hub_id") is not None, "license": source.get("license"),
            "weight": part.get("weight", 1.0), "normalization": part.get("normalization", "none"), "image_size": part.get("image_size"),
            "has_adapters": method_class.adapter_config(config, list(teacher_layers)) is not None,
            "layer_pairs": [
                {"teacher": int(t), "student": int(s), "role": final_role if i == len(teacher_layers) - 1 else other_role}
                for i, (t, s) in enumerate(zip(teacher_layers, student_layers))
            ],
        })  # fmt: skip
    # The loss weights as used (the file keeps None for "the method's default"), so that the JSON
    # shown agrees with the settings table; weights the method does not use are left out.
    weight_fields = {field for field, _ in method_class.loss_weights.values()}
    distillation = {k: v for k, v in distillation.items() if not (k.endswith("_weight") and k not in weight_fields)}
    distillation.update({method_class.loss_weights[term][0]: value for term, value in config.weights().items()})

    last = max(row["layer_pairs"][-1]["student"] for row in teacher_rows)
    feature_is_last = student_depth is not None and last == student_depth - 1
    unused = list(range(last + 1, student_depth)) if student_depth is not None else []
    teacher_hubs = [teachers[key]["hub_id"] for key in parts if teachers[key].get("hub_id")]
    results = _scrub(results) if results else None
    baseline_results = [_scrub(other) for other in baseline_results]
    variables = dict(
        title=f"{_describe_student(student_config)} distilled from {_listed('`' + row['name'] + '`' for row in teacher_rows)} with {method_class.label}",
        model_name=model_name,
        repo_id=repo_id or model_name,
        has_pooler=has_pooler,
        student=student,
        group_size=len(group["students"]) if group else 0,
        group_others=[name for name in group["students"] if name != group["name"]] if group else [],
        license=license,
        dataset_license=dataset_license,
        teachers=teacher_rows,
        dataset=dataset,
        dataset_is_hub=dataset_hub is not None,
        method=method,
        method_label=method_class.label,
        method_summary=method_class.summary,
        settings=method_class.settings(config),
        training=_training_rows(training),
        budget=_budget_rows(trainer_state, training, hardware),
        results_columns=[model_name] + [_backbone_name(other) for other in baseline_results],
        results_rows=_results_rows(results, baseline_results) if results else [],
        results_feature=(results or {}).get("backbone", {}).get("feature"),
        probe_settings=[
            (entry["task"], json.dumps(entry.get("settings", {}), indent=2, default=str))
            for entry in (results or {}).get("results", [])
        ],
        figures=[(Path(path).stem.replace("_", " "), path) for path in figures],
        feature_index=last + 1,
        feature_is_last=feature_is_last,
        student_depth=student_depth,
        unused_student_blocks=unused,
        has_adapters=any(row["has_adapters"] for row in teacher_rows),
        heads_description=method_class.heads_description,
        distillation_json=json.dumps(distillation, indent=2, default=str),
        distillation_included=distillation_included,
        **_artifact_variables(student_dir),
    )
    card_data = ModelCardData(
        model_name=model_name if results else None,
        library_name="transformers",
        license=license,
        tags=list(TAGS),
        base_model=(teacher_hubs[0] if len(teacher_hubs) == 1 else teacher_hubs) or None,
        # The Hub accepts adapter, merge, quantized or finetune (huggingface_hub does not check the
        # field); "distillation" is none of them. finetune, what the Hub infers for a base_model
        # without other markers, is the closest: the student's weights were trained on the teacher's
        # signal. The card's body says it is a distilled student.
        base_model_relation="finetune" if teacher_hubs else None,
        datasets=[dataset_hub] if dataset_hub else None,
        pipeline_tag=PIPELINE_TAG,
        eval_results=_eval_results(results) if results else None,
    )
    template = Path(template_path) if template_path is not None else TEMPLATE_PATH
    if not template.is_file():
        raise ValueError(f"template_path: {template} is not a file")
    card = ModelCard.from_template(card_data, template_path=str(template), **variables)
    output_dir.mkdir(parents=True, exist_ok=True)
    card.save(output_dir / "README.md")
    return card


# Metrics of the evaluation's results.json where lower is better (NYUd RMSE ↓).
LOWER_IS_BETTER = {"rmse", "abs_rel"}


# -- helpers -----------------------------------------------------------------------------------------
def _artifact_variables(student_dir: Path) -> dict:
    """The card's Artifacts section from `artifacts/` (`artifact_report.write_artifact_files`), when the run wrote it."""
    path = student_dir / ARTIFACTS_DIR / ARTIFACT_STATS_FILE
    if not path.is_file():
        return {"artifacts": None}
    stats = _read_json(path, "run_dir", "the artifact statistics")
    labels = {"teacher": "teacher", "refined_teacher": "refined teacher", "student": "student (projected)"}
    rows = []
    for layer in stats.get("layers", []):
        where = f"{layer['teacher']} " if layer.get("teacher") else ""
        for view in VIEWS:
            values = layer["views"].get(view)
            if values is None:
                continue
            block = layer["student_block"] if view == "student" else layer["teacher_block"]
            rows.append({
                "layer": f"{where}{layer['teacher_block']} → {layer['student_block']}",
                "view": f"{labels[view]}, block {block}",
                "outlier_share": "" if values.get("outlier_share") is None else f"{100 * values['outlier_share']:.2f} %",
                "max_median": "" if values.get("max_median") is None else f"{values['max_median']:.2f}",
                "p99_median": "" if values.get("p99_median") is None else f"{values['p99_median']:.2f}",
            })  # fmt: skip
    figures = [f"{ARTIFACTS_DIR}/{name}" for name in ARTIFACT_FIGURES if (student_dir / ARTIFACTS_DIR / name).is_file()]
    if not rows:  # a method that records no features
        return {"artifacts": None}
    return {
        "artifacts": {
            "rows": rows,
            "refined": any("refined_teacher" in layer["views"] for layer in stats.get("layers", [])),
            "ratio": _format(float(stats.get("outlier_ratio", 4.0))),
            "source": _scrub(stats.get("source", "")),
            "figure_images": _scrub(stats.get("figure_images", "")),
            "figures": [(Path(figure).stem.replace("_", " "), figure) for figure in figures],
        }
    }



def _listed(items) -> str:
    """"a", "a and b", "a, b and c"."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _source(name: str) -> tuple[str, str | None]:
    """(name shown, Hub id or None) of a teacher or dataset given as a Hub id or a local path."""
    return public_name(name), hub_id(name)


def _read_json(path: Path, argument: str, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{argument}: {path.parent.name}/{path.name} is missing; it should hold {what}") from None
    except ValueError as error:
        raise ValueError(f"{argument}: {path.name} is not valid JSON ({error})") from None


def _scrub(value: Any) -> Any:
    """Drop secret-looking keys and token-like strings; reduce local paths to their last component."""
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        return without_local_paths(_TOKEN_VALUE.sub("<redacted>", value))
    return value


def _student_config(output_dir: Path) -> dict:
    """The student's config.json ({} when missing): its depth, width, patch size and family."""
    try:
        return json.loads((output_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _weight_names(folder: Path) -> list[str]:
    """The names of the weights saved in a student folder (none when it holds no safetensors file)."""
    names = []
    for path in folder.glob("model*.safetensors"):
        with safe_open(path, "pt") as weights:
            names += list(weights.keys())
    return names


def _describe_student(config: dict) -> str:
    """`ViT (4 blocks, width 64, patch 4)`: what the model is, from its config."""
    family = FAMILY_LABELS.get(config.get("model_type"), "Vision Transformer")
    shape = [
        f"{config['num_hidden_layers']} blocks" if isinstance(config.get("num_hidden_layers"), int) else None,
        f"width {config['hidden_size']}" if isinstance(config.get("hidden_size"), int) else None,
        f"patch {config['patch_size']}" if isinstance(config.get("patch_size"), int) else None,
    ]
    shape = [part for part in shape if part]
    return f"{family} student ({', '.join(shape)})" if shape else f"{family} student"


def card_license(name_or_path: str, repo_type: str = "model") -> str | None:
    """The `license` a model's or dataset's own card declares, read from a local folder or the Hub
    cache (never downloaded); None when no card is at hand or it names none."""
    local = Path(os.path.expanduser(name_or_path))
    if local.exists():
        card = local / "README.md" if local.is_dir() else None
    else:
        try:
            cached = try_to_load_from_cache(name_or_path, "README.md", repo_type=repo_type)
        except (HFValidationError, ValueError):
            return None
        card = Path(cached) if isinstance(cached, str) else None
    if card is None or not card.is_file():
        return None
    value = (metadata_load(card) or {}).get("license")
    return str(value) if value else None


def _training_rows(training: dict | None) -> list[tuple[str, str]]:
    if not training:
        return []
    # The TrainingArguments and our own (distillation fields, output and fault handling): what is not
    # in TRAINING_KEYS among them is bookkeeping, not a hyperparameter.
    from transformers import TrainingArguments  # lazily: only to recognise a full TrainingArguments dict

    standard = {f.name for cls in (TrainingArguments, TrainingDefaults, MethodFields, RunFields) for f in fields(cls)}
    training = _scrub(dict(training))
    max_steps = training.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        training.pop("num_train_epochs", None)  # the Trainer ignores it when max_steps is set
    keys = [k for k in TRAINING_KEYS if k in training]
    keys += [k for k in training if k not in TRAINING_KEYS and k not in standard and k not in _NOT_SHOWN]
    return [(key, _format(training[key])) for key in keys if training[key] is not None]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def _budget_rows(trainer_state: dict | None, training: dict, hardware: dict | None) -> list[tuple[str, str]]:
    """Steps, images seen, global batch, hardware and wall time of the run (no epochs: the Trainer's
    epoch count of a streamed dataset is a fraction of max_steps, not of the data)."""
    rows = []
    processes = (hardware or {}).get("num_processes")
    per_device = training.get("per_device_train_batch_size") or (trainer_state or {}).get("train_batch_size")
    global_batch = None
    if per_device and processes:
        global_batch = int(per_device) * int(training.get("gradient_accumulation_steps") or 1) * int(processes)
    if trainer_state:
        steps = int(trainer_state.get("global_step") or 0)
        rows.append(("Optimisation steps", f"{steps:,}"))
        if global_batch:
            rows.append(("Global batch", f"{global_batch:,} ({processes} × {per_device} × {training.get('gradient_accumulation_steps') or 1} accumulation)"))
            rows.append(("Images seen (steps × global batch)", f"{steps * global_batch:,}"))
    elif global_batch:
        rows.append(("Global batch", f"{global_batch:,}"))
    if hardware:
        rows.append(("Hardware", f"{processes} × {hardware.get('device')}, {hardware.get('precision')}"))
    runtime = next(
        (entry["train_runtime"] for entry in reversed((trainer_state or {}).get("log_history", [])) if "train_runtime" in entry),
        None,
    )
    if runtime is not None:
        rows.append(("Wall time (training loop, last session)", _duration(float(runtime))))
        if trainer_state and global_batch and runtime > 0:
            rows.append(("Throughput", f"{int(trainer_state.get('global_step') or 0) * global_batch / runtime:,.1f} images/s"))
    return rows


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def _metric_key(entry: dict, metric: dict) -> tuple:
    dataset = entry["dataset"]
    return entry["task"], dataset["name"], dataset.get("config"), dataset.get("split"), metric["type"]


def _backbone_name(results: dict) -> str:
    return str(results.get("backbone", {}).get("name_or_path", "?"))


def _results_rows(results: dict, baseline_results: list[dict]) -> list[dict]:
    """One row per metric of the student's results.json, with the baselines' values for the same
    task, dataset, split and metric type (blank where a baseline has none)."""
    baselines = [
        {_metric_key(entry, metric): metric["value"] for entry in other.get("results", []) for metric in entry["metrics"]}
        for other in baseline_results
    ]
    rows = []
    for entry in results.get("results", []):
        dataset = entry["dataset"]
        where = dataset["name"] + (f" ({dataset['config']})" if dataset.get("config") else "")
        where += f", {dataset['split']}" if dataset.get("split") else ""
        for metric in entry["metrics"]:
            arrow = " ↓" if metric["type"] in LOWER_IS_BETTER else ""
            unit = f" ({metric['unit']})" if metric.get("unit") else ""
            key = _metric_key(entry, metric)
            rows.append(
                {
                    "task": entry["task"],
                    "dataset": where,
                    "metric": f"{metric.get('name') or metric['type']}{unit}{arrow}",
                    "values": [_format(metric["value"])] + [_format(b[key]) if key in b else "" for b in baselines],
                }
            )
    return rows


def _eval_results(results: dict) -> list[EvalResult]:
    """The card's `model-index`: every metric of the student's results.json."""
    return [
        EvalResult(
            task_type=entry["task"],
            dataset_type=entry["dataset"]["name"],
            dataset_name=entry["dataset"]["name"],
            dataset_config=entry["dataset"].get("config"),
            dataset_split=entry["dataset"].get("split"),
            dataset_revision=entry["dataset"].get("revision"),
            metric_type=metric["type"],
            metric_value=metric["value"],
            metric_name=metric.get("name"),
        )
        for entry in results.get("results", [])
        for metric in entry["metrics"]
    ]
