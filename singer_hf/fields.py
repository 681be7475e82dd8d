"""The settings of a distillation run, each declared once with its default, help and check.

The classes that take them inherit these dataclasses: the SiNGER adapter's PEFT config
(`AdapterFields`), the model's config (`MethodFields`), and the training arguments (all of them,
`TrainingDefaults` first so that its defaults win over `TrainingArguments`'). This module imports
neither torch nor transformers, so the command-line programs answer `--help` and refuse a bad value
before the heavy imports; `_argument_group_name` titles each group in `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .checks import block_indices, checked_field, integer_at_least, number_at_least, one_of, open_interval

INIT_METHODS = ("nullspace", "random")
NORMALIZATIONS = ("none", "phi-s")
"""The values of `TeacherFields.normalization`."""


@dataclass
class AdapterFields:
    """The SiNGER adapter's settings."""

    _argument_group_name = "distillation"

    rank: int = checked_field(64, help="SiNGER adapter rank r (basis rows per adapter).", check=integer_at_least(1))
    null_threshold: float = checked_field(
        0.05,
        help=(
            "τ: threshold on the singular values of M = (W_fc2 W_fc1)ᵀ; directions with σ < τ form the nullspace. "
            "A gated MLP's value path (W_down W_up)ᵀ has an arbitrary scale: there the rule is σ < τ·σ_max."
        ),
        check=number_at_least(0),
    )
    adapter_init: Literal["nullspace", "random"] = checked_field(
        "nullspace", help=f"One of {list(INIT_METHODS)} (random: the paper's ablation).", check=one_of(INIT_METHODS)
    )
    adapter_seed: int = checked_field(0, help="Seed of the adapters' random rows; block l uses seed + l.", check=integer_at_least(0))

    def adapter_values(self) -> dict:
        return {name: getattr(self, name) for name in AdapterFields.__dataclass_fields__}


def _weight(help: str):
    return checked_field(None, help=help, check=number_at_least(0, optional=True))


def _method_name(value) -> str | None:
    # Which names are registered is the method registry's to say (`methods.get_method`, when the
    # settings are used); here, only that a name was given.
    return None if isinstance(value, str) and value else "must name a distillation method (singer, fitnet, vitkd, ...)"


@dataclass
class MethodFields(AdapterFields):
    """How one student is distilled from one teacher. `None` takes the method's default: its teacher
    layers scaled to the teacher's depth, its loss weights."""

    _argument_group_name = "distillation"

    method: str = checked_field("singer", help="Distillation method: singer, fitnet, vitkd, or any registered one.", check=_method_name)
    teacher_layers: list[int] | None = checked_field(
        None, help="Distilled teacher blocks (0-based); default: the method's, scaled to the teacher's depth.", check=block_indices(optional=True)
    )
    outlier_quantile: float = checked_field(
        0.97, help="q: per-image norm quantile above which patch tokens are outliers (SiNGER).", check=open_interval(0, 1)
    )
    kd_weight: float | None = _weight("λ_KD (default: singer 1, fitnet 10, vitkd mimic 1).")
    outlier_weight: float | None = _weight("λ_out (default: singer 0.01).")
    info_weight: float | None = _weight("λ_info (default: singer 1; 0 is the ablation).")
    generation_weight: float | None = _weight("ViTKD generation weight (default 1).")
    mask_ratio: float = checked_field(0.5, help="Fraction of student patch tokens ViTKD masks.", check=open_interval(0, 1))

    def method_values(self) -> dict:
        return {name: getattr(self, name) for name in MethodFields.__dataclass_fields__}


@dataclass
class TeacherFields:
    """How one teacher takes part when a student learns from several (agglomerative distillation)."""

    weight: float = checked_field(1.0, help="This teacher's share of each student's loss.", check=number_at_least(0))
    layers: list[int] | None = checked_field(
        None, help="Its distilled blocks (0-based); default: each method's, scaled to its depth.", check=block_indices(optional=True)
    )
    normalization: str = checked_field(
        "none",
        help=(
            "Normalisation of its KD targets: 'none' (its features as they are), or 'phi-s' (PHI-S: rotated and scaled "
            "to unit variance in every dimension, with statistics estimated from its unrefined features before "
            "training; recommended with several teachers, so that no teacher outweighs another by its feature scale)."
        ),
        check=one_of(NORMALIZATIONS),
    )

    def teacher_values(self) -> dict:
        return {name: getattr(self, name) for name in TeacherFields.__dataclass_fields__}


@dataclass
class RunFields:
    """How a run protects its results and what it reports beside the losses."""

    _argument_group_name = "reliability and reporting"

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a non-empty output_dir (its checkpoints and results are removed)."}
    )
    max_nonfinite_steps: int = checked_field(
        10, help="Stop after this many consecutive skipped steps with a non-finite loss (0: at the first).", check=integer_at_least(0)
    )
    artifact_stats: bool = field(
        default=True,
        metadata={
            "help": "Log the high-norm artifact statistics of the features each step compared (teacher, refined teacher, "
            "student: outlier share, max/median, p99/median patch norm) as artifacts/<view>/<layer>/<stat>, and write "
            "patch-norm figures and the card's Artifacts table at the end."
        },
    )


@dataclass
class TrainingDefaults:
    """`TrainingArguments` fields whose defaults differ for a distillation run. The optimiser follows the
    paper's run: AdamW, lr 1e-3, weight decay 1e-4, cosine decay to lr·1e-4 after a 5 % warm-up, no
    gradient clipping."""

    _argument_group_name = "training: the paper's defaults (more transformers.TrainingArguments below)"

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "Learning-rate schedule."})
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: {"min_lr_rate": 1e-4}, metadata={"help": "Cosine floor: lr·1e-4."}
    )
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up: steps, or a fraction of training if < 1."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm, per student; 0: none, as in the paper."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Images are transformed on the fly."})
    save_safetensors: bool = True
    hub_strategy: str = field(default="end", metadata={"help": "Only 'end': the finished student is published, never a checkpoint."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters. Off: DistillationModel freezes the student parameters no loss reaches, "
            "so every trainable parameter gets a gradient at every step and DDP need not search the graph for unused ones."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "Off: it costs a host sync per step; non-finite steps are skipped on the device."}
    )
