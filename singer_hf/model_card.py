"""`write_student_card`: a Hub model card (README.md) for a distilled student folder.

The card is rendered from ONE template, `model_cards/student.md` at the top of the repository (a
Jinja template in the format `huggingface_hub.ModelCard.from_template` expects). That folder is not
package data: when singer-hf is installed non-editable, or the file is missing for any other reason,
the card falls back to `huggingface_hub`'s default model card template, filled with the same facts
(summary, configuration, usage, citation). Pass `template_path` to use another template.

Nothing private goes into the card: a local teacher or dataset appears by its folder name only (no
absolute paths, no home directory), and keys that look like secrets (`*token*`, `*password*`,
`*secret*`, `*api_key*`) and token-like strings are dropped from the configuration shown.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .modeling import DistillationConfig

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "student.md"
"""The student card template, when this package runs from a repository checkout."""

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

METHOD_LABELS = {"singer": "SiNGER", "fitnet": "FitNet", "vitkd": "ViTKD"}
METHOD_SUMMARIES = {
    "singer": (
        "SiNGER (Singular Nullspace-Guided Energy Reallocation) refines the teacher's features before "
        "distilling them: a low-rank adapter on each distilled teacher block adds a perturbation that "
        "lowers the norm of high-norm artifact tokens while lying near the nullspace of the next block, "
        "so the information the teacher carries forward is preserved. The student mimics the refined "
        "features through a linear projector."
    ),
    "fitnet": (
        "FitNet (the paper's baseline): the student mimics the teacher's raw features, high-norm artifact "
        "tokens included, through a linear projector and a mean-squared error."
    ),
    "vitkd": (
        "ViTKD (a baseline in the paper): the student mimics the teacher's shallow blocks through linear "
        "projectors, and a generator reconstructs the teacher's last block from randomly masked student "
        "tokens."
    ),
}
HEADS = {
    "singer": "the linear projectors (student width → teacher width), one per block pair.",
    "fitnet": "the linear projectors (student width → teacher width), one per block pair.",
    "vitkd": "the mimic projectors, the generation projector, the generator and the mask token.",
}
WEIGHT_LABELS = {"kd": "KD", "mimic": "mimic", "outlier": "outlier", "info": "information", "generation": "generation"}

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
    teacher_name: str,
    dataset_name: str,
    distillation: dict,
    training: dict | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Write `output_dir/README.md`, a model card for the student saved there, and return it.

    Args:
        output_dir: the student folder (`SingerTrainer.save_model`'s output); created if missing.
            Its `config.json`, when present, gives the student's depth.
        teacher_name: the teacher's Hub id or local path (a local path is shown by its folder name).
        dataset_name: the training data's Hub id or local path (same rule).
        distillation: the contents of `distillation/distillation_config.json` as `SingerTrainer`
            writes them: the `DistillationConfig` fields plus the resolved `teacher_layers` and
            `student_layers`.
        training: optional training settings, e.g. `training_args.to_dict()` (only the usual
            optimisation settings of a `TrainingArguments` dict are shown) or a small dict of your own
            (shown in full, e.g. `{"global_batch_size": 512}`).
        license: the card's `license` metadata; left out by default, since the student's terms follow
            its teacher's and its data's.
        repo_id: the Hub repo the card's usage example loads; default: the folder's name.
        template_path: another Jinja template; default `model_cards/student.md` (see the module doc).
    """
    output_dir = Path(output_dir)
    teacher_hub, dataset_hub = _hub_id(teacher_name), _hub_id(dataset_name)
    teacher = teacher_hub or _local_name(teacher_name)
    dataset = dataset_hub or _local_name(dataset_name)
    model_name = _local_name(str(output_dir))

    distillation = _scrub(dict(distillation))
    method = distillation.get("method", "singer")
    if method not in METHOD_LABELS:
        raise ValueError(f"distillation: unknown method {method!r}; expected one of {sorted(METHOD_LABELS)}")
    teacher_layers, student_layers = distillation.get("teacher_layers"), distillation.get("student_layers")
    if not teacher_layers or not student_layers or len(teacher_layers) != len(student_layers):
        raise ValueError(
            "distillation: needs `teacher_layers` and `student_layers` of the same length, as in "
            f"distillation/distillation_config.json; got {teacher_layers!r} and {student_layers!r}"
        )
    known = {f.name for f in fields(DistillationConfig)}
    config = DistillationConfig(**{k: v for k, v in distillation.items() if k in known})

    student_depth = _student_depth(output_dir)
    last = int(student_layers[-1])
    feature_is_last = student_depth is not None and last == student_depth - 1
    unused = list(range(last + 1, student_depth)) if student_depth is not None else []
    final_role, other_role = ("generated", "mimicked") if method == "vitkd" else ("final", "intermediate")
    layer_pairs = [
        {"teacher": int(t), "student": int(s), "role": final_role if i == len(teacher_layers) - 1 else other_role}
        for i, (t, s) in enumerate(zip(teacher_layers, student_layers))
    ]
    variables = dict(
        model_name=model_name,
        repo_id=repo_id or model_name,
        teacher=teacher,
        teacher_is_hub=teacher_hub is not None,
        dataset=dataset,
        dataset_is_hub=dataset_hub is not None,
        method=method,
        method_label=METHOD_LABELS[method],
        method_summary=METHOD_SUMMARIES[method],
        layer_pairs=layer_pairs,
        settings=_settings(config),
        training=_training_rows(training),
        feature_index=last + 1,
        feature_is_last=feature_is_last,
        student_depth=student_depth,
        unused_student_blocks=unused,
        has_adapters=method == "singer",
        heads_description=HEADS[method],
        distillation_json=json.dumps(distillation, indent=2, default=str),
    )
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=list(TAGS),
        base_model=teacher_hub,
        datasets=[dataset_hub] if dataset_hub else None,
        pipeline_tag=PIPELINE_TAG,
    )
    template = Path(template_path) if template_path is not None else TEMPLATE_PATH
    if template.is_file():
        card = ModelCard.from_template(card_data, template_path=str(template), **variables)
    else:
        card = ModelCard.from_template(card_data, **_default_template_variables(variables))
    output_dir.mkdir(parents=True, exist_ok=True)
    card.save(output_dir / "README.md")
    return card


# -- helpers -----------------------------------------------------------------------------------------
def _hub_id(name: str) -> str | None:
    """`name` if it reads as a Hub repo id and is not a local path, else None."""
    if not name or os.path.isabs(name) or name.startswith(("~", ".")) or os.path.exists(os.path.expanduser(name)):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _local_name(path: str) -> str:
    """The last component of a local path: never the directories above it."""
    name = Path(os.path.expanduser(str(path))).name
    return name or "model"


def _looks_local(value: str) -> bool:
    home = os.path.expanduser("~")
    return os.path.isabs(value) or value.startswith("~") or (home not in ("", "/") and home in value)


def _scrub(value: Any) -> Any:
    """Drop secret-looking keys and token-like strings; reduce local paths to their last component."""
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        value = _TOKEN_VALUE.sub("<redacted>", value)
        return _local_name(value) if _looks_local(value) else value
    return value


def _student_depth(output_dir: Path) -> int | None:
    try:
        config = json.loads((output_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    depth = config.get("num_hidden_layers")
    return int(depth) if isinstance(depth, int) else None


def _settings(config: DistillationConfig) -> list[tuple[str, str]]:
    weights = ", ".join(f"{WEIGHT_LABELS.get(name, name)} {value:g}" for name, value in config.weights().items())
    if config.method == "singer":
        return [
            ("Adapter rank", str(config.rank)),
            ("Nullspace threshold τ", f"{config.null_threshold:g}"),
            ("Adapter initialisation", f"{config.adapter_init} (seed {config.adapter_seed})"),
            ("Outlier quantile q", f"{config.outlier_quantile:g}"),
            ("Loss weights", weights),
        ]
    if config.method == "vitkd":
        return [("Mask ratio", f"{config.mask_ratio:g}"), ("Loss weights", weights)]
    return [("Loss weights", weights)]


def _training_rows(training: dict | None) -> list[tuple[str, str]]:
    if not training:
        return []
    from transformers import TrainingArguments  # lazily: only to recognise a full TrainingArguments dict

    standard = {f.name for f in fields(TrainingArguments)} | {f.name for f in fields(DistillationConfig)}
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


def _default_template_variables(v: dict) -> dict:
    """The same facts for `huggingface_hub`'s default model card template (used without ours)."""
    pairs = ", ".join(f"teacher block {p['teacher']} → student block {p['student']}" for p in v["layer_pairs"])
    index = -1 if v["feature_is_last"] else v["feature_index"]
    settings = "; ".join(f"{name}: {value}" for name, value in v["settings"] + v["training"])
    code = (
        "```python\nimport torch\nfrom transformers import AutoImageProcessor, AutoModel\n\n"
        f'repo = "{v["repo_id"]}"\nprocessor = AutoImageProcessor.from_pretrained(repo)\n'
        "model = AutoModel.from_pretrained(repo).eval()\n"
        "with torch.no_grad():\n"
        "    outputs = model(**processor(images=image, return_tensors=\"pt\"), output_hidden_states=True)\n"
        f"features = outputs.hidden_states[{index}]  # the distilled features, before the final LayerNorm\n```"
    )
    return dict(
        model_id=v["model_name"],
        model_summary=f"A ViT student distilled with {v['method_label']} from {v['teacher']} with singer-hf.",
        model_description=f"{v['method_summary']} Distilled blocks: {pairs}. {settings}.",
        model_type="Vision Transformer (image feature extractor)",
        base_model=v["teacher"],
        paper="https://openreview.net/forum?id=exjrxVc2yT",
        get_started_code=code,
        training_data=v["dataset"],
        bias_risks_limitations=(
            "The student inherits its teacher's biases; results depend on the teacher and the data. "
            "It was trained to reproduce features, not to classify."
        ),
        citation_bibtex=f"```bibtex\n{BIBTEX}\n```",
    )
