"""The distillation fields, defined once: each field's default, help and check.

`DistillationConfig`, `SingerConfig` (the PEFT adapter) and `SingerTrainingArguments` all take
these fields; they read their defaults from `DISTILLATION_FIELDS` and run the same checks, so a
value is accepted or refused with the same one-line message wherever it is given, and before any
model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

METHODS = ("singer", "fitnet", "vitkd")
INIT_METHODS = ("nullspace", "random")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_of(choices: tuple) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"must be one of {list(choices)}"


def integer_at_least(low: int) -> Callable[[Any], str | None]:
    return lambda value: None if _integer(value) and value >= low else f"must be >= {low} (an integer)"


def number_at_least(low: float, optional: bool = False) -> Callable[[Any], str | None]:
    def check(value):
        if value is None and optional:
            return None
        return None if _number(value) and value >= low else f"must be >= {low} (a finite number)"

    return check


def open_interval(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda value: None if _number(value) and low < value < high else f"must be in ({low}, {high})"


def check_layers(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not all(_integer(layer) for layer in value):
        return "must be a list of block indices (integers >= 0), e.g. [17, 23]"
    if not value:
        return "give at least one teacher block index, e.g. [17, 23]"
    if min(value) < 0:
        return "block indices must be >= 0"
    if len(set(value)) != len(value):
        return "duplicate layers; each block can be distilled once"
    return None


@dataclass(frozen=True)
class FieldSpec:
    default: Any
    help: str
    check: Callable[[Any], str | None]
    """Returns None for a valid value, else what valid values are (the message after "name: ")."""

    def field(self):
        return field(default=self.default, metadata={"help": self.help})


DISTILLATION_FIELDS: dict[str, FieldSpec] = {
    "method": FieldSpec("singer", f"One of {list(METHODS)}.", one_of(METHODS)),
    "teacher_layers": FieldSpec(
        None, "Distilled teacher blocks; default: the method's, scaled to the teacher's depth.", check_layers
    ),
    "rank": FieldSpec(64, "SiNGER adapter rank r.", integer_at_least(1)),
    "null_threshold": FieldSpec(0.05, "Singular-value threshold τ of the nullspace.", number_at_least(0)),
    "adapter_init": FieldSpec("nullspace", f"One of {list(INIT_METHODS)} (random: the ablation).", one_of(INIT_METHODS)),
    "adapter_seed": FieldSpec(0, "Seed of the adapters' random rows.", integer_at_least(0)),
    "outlier_quantile": FieldSpec(
        0.97, "q: per-image norm quantile above which patch tokens are outliers.", open_interval(0, 1)
    ),
    "kd_weight": FieldSpec(None, "λ_KD (singer 1, fitnet 10, vitkd mimic 1).", number_at_least(0, optional=True)),
    "outlier_weight": FieldSpec(None, "λ_out (singer 0.01).", number_at_least(0, optional=True)),
    "info_weight": FieldSpec(None, "λ_info (singer 1; 0 is the ablation).", number_at_least(0, optional=True)),
    "generation_weight": FieldSpec(None, "ViTKD generation weight (1).", number_at_least(0, optional=True)),
    "mask_ratio": FieldSpec(0.5, "Fraction of student patch tokens ViTKD masks.", open_interval(0, 1)),
}


def check_value(name: str, value, spec_name: str | None = None) -> None:
    """Raises `ValueError("name: must be ..., got ...")` when `value` fails the check of `spec_name` (default `name`)."""
    problem = DISTILLATION_FIELDS[spec_name or name].check(value)
    if problem is not None:
        raise ValueError(f"{name}: {problem}, got {value!r}")


@dataclass
class DistillationFields:
    """The distillation fields as a dataclass, to inherit from (see `DISTILLATION_FIELDS` for their meaning)."""

    _argument_group_name = "distillation"  # a title in the scripts' --help (HfArgumentParser)

    method: Literal["singer", "fitnet", "vitkd"] = DISTILLATION_FIELDS["method"].field()
    teacher_layers: list[int] | None = DISTILLATION_FIELDS["teacher_layers"].field()
    rank: int = DISTILLATION_FIELDS["rank"].field()
    null_threshold: float = DISTILLATION_FIELDS["null_threshold"].field()
    adapter_init: Literal["nullspace", "random"] = DISTILLATION_FIELDS["adapter_init"].field()
    adapter_seed: int = DISTILLATION_FIELDS["adapter_seed"].field()
    outlier_quantile: float = DISTILLATION_FIELDS["outlier_quantile"].field()
    kd_weight: float | None = DISTILLATION_FIELDS["kd_weight"].field()
    outlier_weight: float | None = DISTILLATION_FIELDS["outlier_weight"].field()
    info_weight: float | None = DISTILLATION_FIELDS["info_weight"].field()
    generation_weight: float | None = DISTILLATION_FIELDS["generation_weight"].field()
    mask_ratio: float = DISTILLATION_FIELDS["mask_ratio"].field()

    def check_distillation_fields(self) -> None:
        """Checks every field; sorts `teacher_layers`."""
        for name in DISTILLATION_FIELDS:
            check_value(name, getattr(self, name))
        if self.teacher_layers is not None:
            self.teacher_layers = sorted(self.teacher_layers)

    def distillation_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in DISTILLATION_FIELDS}


@dataclass
class TrainingDefaults:
    """`TrainingArguments` fields whose defaults differ for a distillation run (`SingerTrainingArguments` lists
    this class first so that they win). The optimiser follows the paper run: AdamW, lr 1e-3, weight decay
    1e-4, cosine decay to lr·1e-4 after a 5 % warm-up, no gradient clipping."""

    _argument_group_name = "training: the paper's defaults (more transformers.TrainingArguments below)"

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "Learning-rate schedule."})
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: {"min_lr_rate": 1e-4}, metadata={"help": "Cosine floor: lr·1e-4."}
    )
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up: steps, or a fraction of training if < 1."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm; 0: none, as in the paper."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Images are transformed on the fly."})
    save_safetensors: bool = True
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters. Off: DistillationModel freezes the student parameters no loss reaches, "
            "so every trainable parameter gets a gradient at every step and DDP need not search the graph for unused ones."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "Off: it costs a host sync per step; SingerTrainer skips non-finite steps itself."}
    )


@dataclass
class ReliabilityFields:
    """How a run protects its results (see `checkpoints.py`)."""

    _argument_group_name = "reliability"

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a non-empty output_dir (its checkpoints and adapters are removed)."}
    )
    max_nonfinite_steps: int = field(
        default=10, metadata={"help": "Stop after this many consecutive skipped steps with a non-finite loss (0: at the first)."}
    )


# Training arguments a distillation run needs in range; transformers checks some of them only when
# they are used (a batch size of 0 fails inside the DataLoader), so they are checked up front here.
TRAINING_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "per_device_train_batch_size": integer_at_least(1),
    "gradient_accumulation_steps": integer_at_least(1),
    "learning_rate": lambda value: None if _number(value) and value > 0 else "must be a finite number > 0",
    "weight_decay": number_at_least(0),
    "num_train_epochs": lambda value: None if _number(value) and value > 0 else "must be a number > 0",
    "max_steps": lambda value: None if _integer(value) and (value > 0 or value == -1) else "must be > 0, or -1 to use num_train_epochs",
    "warmup_steps": number_at_least(0),
    "max_grad_norm": number_at_least(0, optional=True),
    "seed": integer_at_least(0),
    "dataloader_num_workers": integer_at_least(0),
    "max_nonfinite_steps": integer_at_least(0),
}


def check_training_arguments(args) -> None:
    for name, check in TRAINING_CHECKS.items():
        value = getattr(args, name)
        problem = check(value)
        if problem is not None:
            raise ValueError(f"{name}: {problem}, got {value!r}")
