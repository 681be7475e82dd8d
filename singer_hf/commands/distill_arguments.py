"""The arguments of `singer-distill` / `scripts/distill.py` and every check that needs neither torch nor
the models, so that `--help`, a typo or a bad path are answered in a second, before the imports of the
run itself (`singer_hf.commands.distill`).

    python scripts/distill.py configs/vit_l_to_vit_t_singer.yaml            # a recipe
    python scripts/distill.py configs/demo.yaml --max_steps 50               # a recipe, overridden
    accelerate launch --config_file accelerate_configs/multi_gpu_ddp_bf16.yaml scripts/distill.py RECIPE
    singer-distill configs/demo.yaml                                         # the installed console script

Arguments are the model and data dataclasses below, the distillation fields and
`transformers.TrainingArguments` (`--help` lists them in that order); a YAML or JSON recipe given
anywhere on the command line supplies defaults that command-line flags override. Errors are one line
on stderr (the traceback with --debug or SINGER_DEBUG=1). Ctrl-C or SIGTERM writes a checkpoint and
prints the command that resumes. The result is a plain Hugging Face student folder that
`AutoModel.from_pretrained` loads without this package.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from singer_hf.checks import check_fields
from singer_hf.cli import (
    StrictArgumentParser,
    UsageError,
    check_hub_reachable,
    check_local_path,
    read_mapping_file,
    run_cli,
    source_fields,
)
from singer_hf.fields import MethodFields, RunFields, TeacherFields, TrainingDefaults

DESCRIPTION = "Distil a ViT teacher into a ViT student with SiNGER (or the FitNet / ViTKD baselines)."
# Library noise a user can do nothing about: PEFT calls a deprecated transformers helper, and
# torchdata's stateful DataLoader (resumable streams) calls a deprecated torch one.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)

# ViT-Ti/S/B (DeiT widths): hidden size, heads; 12 blocks, MLP ratio 4, built at the teacher's
# patch size and resolution, like the paper's from-scratch students.
STUDENT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
IMAGENET_JPEG_BYTES = 110_000
"""Mean size of an ImageNet-1k training JPEG: what a streamed shuffle buffer holds per example."""


@dataclass
class StudentArguments:
    """One student's model: a model to start from, or a new ViT of a size (with changes)."""

    _argument_group_name = "models"

    student_name_or_path: str | None = field(default=None, metadata={"help": "Student to start from: Hub id or folder."})
    student_size: Literal[tuple(STUDENT_SIZES)] | None = field(
        default=None, metadata={"help": f"Or a new ViT student trained from scratch: one of {sorted(STUDENT_SIZES)}."}
    )
    student_config_overrides: str | None = field(
        default=None, metadata={"help": 'Changes to a from-scratch student config, e.g. "num_hidden_layers=6,hidden_size=96".'}
    )


@dataclass(kw_only=True)
class ModelArguments(StudentArguments):
    _argument_group_name = "models"

    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher: Hub id or local folder (HF or timm ViT). Or several, with --teachers."}
    )
    teachers: str | None = field(
        default=None,
        metadata={
            "help": "Several teachers distilled into every student at once: a YAML/JSON file holding a list of teachers "
            "(in a recipe, the list itself). Each entry: a name (its log keys and distillation/ subfolder), "
            "teacher_name_or_path, image_processor_name_or_path (default: the teacher's own), weight, layers and "
            "normalization ('phi-s' recommended). The students read the images as --image_processor_name_or_path "
            "gives them, by default as the first teacher's processor does; every other teacher gets them "
            "re-normalised and resized to its own processor's statistics and size."
        },
    )
    students: str | None = field(
        default=None,
        metadata={
            "help": "Several students trained together from one teacher pass: a YAML/JSON file holding a list of "
            "students (in a recipe, the list itself). Each entry: a name (its output subfolder), its model "
            "(student_size or student_name_or_path, student_config_overrides) and any distillation field (method, "
            "rank, teacher_layers, kd_weight, ...); what an entry leaves out it takes from the run's own arguments "
            "(the model fields only when it names no model of its own)."
        },
    )
    image_processor_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Image processor (mean, std, size) to use instead of the teacher's (with --teachers: the students' "
            "processor, default the first teacher's): a Hub id or folder, or 'default' for the teacher family's "
            "default processor at the teacher's image size."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub code for the models (off by default)."})


@dataclass(kw_only=True)
class TeacherEntry(TeacherFields):
    """One teacher of a run: its name, its model and processor, and how it takes part (`fields.TeacherFields`)."""

    name: str = field(metadata={"help": "The teacher's name: its log keys (loss/<teacher>/<term>) and distillation/ subfolder."})
    teacher_name_or_path: str = field(metadata={"help": "Hub id or local folder (HF or timm ViT)."})
    image_processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Its image processor (mean, std, size): default its own; 'default': its family's."}
    )


@dataclass(kw_only=True)
class StudentEntry(StudentArguments, MethodFields):
    """One entry of `--students`: the student's name, its model and how it is distilled."""

    name: str = field(metadata={"help": "The student's name: its output subfolder, its log keys (loss/<name>/<term>)."})


UNNAMED = "default"
"""The name of a run's one student or teacher when no `--students` / `--teachers` are given
(`singer_hf.modeling.DEFAULT_NAME`)."""
ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RESERVED_NAMES = ("runs", "distillation", "artifacts", UNNAMED)
"""Names a student or teacher cannot take: the run's own subfolders (tensorboard's `runs/`,
`checkpoint-N/`), a student's, and the name of the one unnamed student or teacher."""


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset_name: str = field(metadata={"help": "HF dataset: Hub id, local folder, or a local Parquet/Arrow/JSONL file."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split to distil on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Split to report the distillation loss on (with --eval_strategy steps/epoch)."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (needs --max_steps)."})
    shuffle_buffer: int = field(
        default=10_000,
        metadata={
            "help": "Shuffle buffer of a streamed dataset, in examples (0: none). Each DataLoader worker holds its own "
            "buffer of encoded examples: ~110 KB per ImageNet JPEG, so 10,000 is ~1.1 GB per worker."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on only the first N examples."})
    max_bad_image_share: float = field(
        default=0.1, metadata={"help": "Stop when more than this share of the examples has no usable image."}
    )
    bad_image_window: int = field(
        default=1000, metadata={"help": "...counted over at least this many examples (the first ones)."}
    )


OWN_ARGUMENTS = (ModelArguments, DataArguments, MethodFields, TrainingDefaults, RunFields)
"""This script's own arguments (imported without torch), listed before the other `TrainingArguments` in --help."""


def check_command_line(argv: list[str]) -> None:
    """Everything that needs neither torch nor the models: `--help`, unknown flags, the values of this script's
    own arguments, local paths, and that the Hub answers when an argument is a Hub id.

    Run before the imports below (torch, transformers' models and Trainer, PEFT, datasets: seconds) when the
    script starts. The other `TrainingArguments` flags are read from transformers' source here; their values
    are parsed by `parse_arguments`.
    """
    trainer_fields = source_fields("transformers.training_args", "TrainingArguments")
    if trainer_fields is None:  # a transformers release laid out otherwise: the full parse, seconds slower
        from singer_hf.trainer import FeatureDistillationArguments

        parser = StrictArgumentParser((ModelArguments, DataArguments, FeatureDistillationArguments))
    else:
        description = DESCRIPTION + " A YAML/JSON recipe anywhere on the command line supplies defaults; flags override it."
        usage = (
            "%(prog)s [RECIPE.yaml] (--teacher_name_or_path NAME | --teachers FILE) (--student_size SIZE | "
            "--student_name_or_path NAME | --students FILE) --dataset_name NAME [FLAGS]"
        )
        parser = StrictArgumentParser(OWN_ARGUMENTS, usage=usage, description=description)
        parser.add_source_fields("training: the other transformers.TrainingArguments", trainer_fields)
    model_args, data_args, distillation, *_ = parser.parse(argv)
    check_fields(distillation)
    students = run_students(model_args, distillation)
    teachers = run_teachers(model_args, students)
    names = {}
    for name, entry in teachers.items():
        names[entry_argument("teacher_name_or_path", "teacher", name, teachers)] = entry.teacher_name_or_path
        if entry.image_processor_name_or_path != "default":
            names[entry_argument("image_processor_name_or_path", "teacher", name, teachers)] = entry.image_processor_name_or_path
    for name, entry in students.items():
        names[entry_argument("student_name_or_path", "student", name, students)] = entry.student_name_or_path
    if model_args.teachers is not None and model_args.image_processor_name_or_path not in (None, "default"):
        names["image_processor_name_or_path"] = model_args.image_processor_name_or_path
    names["dataset_name"] = data_args.dataset_name
    for argument, name in names.items():
        check_local_path(argument, name)
    check_hub_reachable(names)


def run_teachers(model_args: ModelArguments, students: dict[str, StudentEntry]) -> dict[str, TeacherEntry]:
    """The run's teachers by name, in order (the first sets the students' patch size and, by default, their
    images): the one teacher of `--teacher_name_or_path` (`UNNAMED`, its processor
    `--image_processor_name_or_path`), or the `--teachers` entries. Needs neither torch nor the models."""
    if model_args.teachers is None:
        if model_args.teacher_name_or_path is None:
            raise UsageError("teacher_name_or_path: give the teacher (a Hub id or a local folder), or several with --teachers FILE")
        entry = TeacherEntry(
            name=UNNAMED, teacher_name_or_path=model_args.teacher_name_or_path,
            image_processor_name_or_path=model_args.image_processor_name_or_path,
        )  # fmt: skip
        return {UNNAMED: entry}
    if model_args.teacher_name_or_path is not None:
        raise UsageError("teachers: give either --teacher_name_or_path (one teacher) or --teachers (several), not both")
    teachers = {}
    parser = StrictArgumentParser(TeacherEntry)
    for name, values in _named_entries(model_args.teachers, "teachers", "teacher", "its log keys and distillation/ subfolder"):
        (teachers[name],) = parser.parse_mapping(values, f"teachers entry {name!r}")
        try:
            check_fields(teachers[name])
        except ValueError as error:
            raise UsageError(f"teachers entry {name!r}: {error}") from None
    if len(teachers) > 1:
        given = [name for name, entry in students.items() if entry.teacher_layers is not None]
        if given:
            where = "" if given == [UNNAMED] else f" (students {given})"
            raise UsageError(
                f"teacher_layers{where}: with several teachers, give each teacher's blocks as `layers` in its teachers entry"
            )
    return teachers


def run_students(model_args: ModelArguments, distillation: MethodFields) -> dict[str, StudentEntry]:
    """The run's students by name, each with its model and method settings checked: the one student of the
    arguments (`UNNAMED`), or the `--students` entries, which take what they leave out from the
    arguments. Needs neither torch nor the models."""
    shared_model = {name: getattr(model_args, name) for name in StudentArguments.__dataclass_fields__}
    if model_args.students is None:
        entries = {UNNAMED: StudentEntry(name=UNNAMED, **shared_model, **distillation.method_values())}
    else:
        entries = {}
        parser = StrictArgumentParser(StudentEntry)
        for name, values in _named_entries(model_args.students, "students", "student", "its output subfolder"):
            (parsed,) = parser.parse_mapping(values, f"students entry {name!r}")
            own_model = any(values.get(key) is not None for key in ("student_size", "student_name_or_path"))
            given = {key: getattr(parsed, key) for key in values}
            entries[name] = StudentEntry(**{**distillation.method_values(), **({} if own_model else shared_model), **given})
            try:
                check_fields(entries[name])
            except ValueError as error:
                raise UsageError(f"students entry {name!r}: {error}") from None
    for name, entry in entries.items():
        if (entry.student_name_or_path is None) == (entry.student_size is None):
            raise UsageError(
                f"{entry_argument('student_name_or_path / student_size', 'student', name, entries)}: give exactly one "
                "(a model to start from, or tiny/small/base)"
            )
    return entries


def _named_entries(value: str | list, argument: str, kind: str, role: str) -> list[tuple[str, dict]]:
    """(name, mapping) of each entry of a `--students` / `--teachers` list, names checked: `role` says what
    the name is used for."""
    entries, names = [], set()
    for index, values in enumerate(_entry_list(value, argument), 1):
        if not isinstance(values, dict):
            raise UsageError(f"{argument}: entry {index} must be a mapping of field names to values, got {values!r}")
        name = values.get("name")
        if not isinstance(name, str) or not ENTRY_NAME.match(name) or name in RESERVED_NAMES or name.startswith("checkpoint-"):
            raise UsageError(
                f"{argument}: entry {index} needs a name of letters, digits, '_' and '-' ({role}; not "
                f"{', '.join(RESERVED_NAMES)} or checkpoint-N), got {name!r}"
            )
        if name in names:
            raise UsageError(f"{argument}: two entries are named {name!r}; each {kind} needs its own name ({role})")
        names.add(name)
        entries.append((name, values))
    return entries


def _entry_list(value: str | list, argument: str) -> list:
    """The list of `--students` / `--teachers`: a recipe's list, JSON text, or a YAML/JSON file holding it."""
    if isinstance(value, list):
        entries = value
    elif value.lstrip().startswith("["):
        try:
            entries = json.loads(value)
        except json.JSONDecodeError as error:
            raise UsageError(f"{argument}: not a valid JSON list ({error})") from None
    else:
        if not Path(value).expanduser().is_file():
            raise UsageError(f"{argument}: {value} does not exist; give a YAML/JSON file holding the list of {argument}")
        entries = read_mapping_file(str(Path(value).expanduser()), argument)
    if not isinstance(entries, list) or not entries:
        shown = value if isinstance(value, str) and len(value) < 80 else "the value"
        raise UsageError(f"{argument}: {shown} must hold a non-empty list of {argument} (each a mapping with a name)")
    return entries


def entry_argument(argument: str, kind: str, name: str, entries: dict) -> str:
    """How errors name an entry's argument: "student_size", or "student_size (student 'tiny')" in a group."""
    return argument if list(entries) == [UNNAMED] else f"{argument} ({kind} {name!r})"


def cli() -> None:
    """`singer-distill` and `python scripts/distill.py`: the command line checked before torch is imported,
    then the run (`singer_hf.commands.distill.main`); errors as one line."""
    run_cli(check_command_line)
    from singer_hf.commands import distill

    run_cli(functools.partial(distill.main, command_line_checked=True))
