"""`singer-distill` / `scripts/distill.py`: distil a ViT teacher into one or several ViT students with SiNGER
(or the FitNet / ViTKD baselines). The arguments and the checks that need no torch are in
`distill_arguments` (run first, so that `--help` and a typo answer in a second); `main` is the run.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoModel, set_seed
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

from singer_hf import DistillationModel, resolve_vit
from singer_hf.architectures import ResolvedViT, load_backbone
from singer_hf.checkpoints import check_output_dir, clear_previous_run, resolve_checkpoint
from singer_hf.cli import StrictArgumentParser, UsageError, rerun_command, run_cli
from singer_hf.data import (
    ImageTransform,
    PixelValuesCollator,
    build_transforms,
    image_processor_stats,
    load_image_dataset,
    student_image_processor,
    with_image_transform,
)
from singer_hf.modeling import DistillationModelConfig, TeacherSettings, outgrown_teacher, plan_layers
from singer_hf.layout import DISTILLATION_DIR
from singer_hf.locations import public_name
from singer_hf.publishing import PublishError, check_publishable
from singer_hf.callbacks import EpochCallback
from singer_hf.trainer import FeatureDistillationArguments, FeatureDistillationTrainer, student_repo_ids
from singer_hf.tuner import basis_block

from .distill_arguments import (
    IMAGENET_JPEG_BYTES,
    STUDENT_SIZES,
    UNNAMED,
    DataArguments,
    ModelArguments,
    StudentArguments,
    StudentEntry,
    TeacherEntry,
    check_command_line,
    entry_argument,
    run_students,
    run_teachers,
)

logger = logging.getLogger("singer_hf.distill")
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
"""A source checkout's `scripts/`, which the commands printed for the user name."""
CONSOLE_SCRIPTS = {"distill": "singer-distill", "push_to_hub": "singer-push"}


def printed_command(program: str, argv: list[str]) -> str:
    """The command a user copies to run `program` with `argv`: the checkout's `scripts/<program>.py` (with this
    process's interpreter), or the console script of an installed package without them."""
    script = SCRIPTS / f"{program}.py"
    return rerun_command(script, argv) if script.is_file() else shlex.join([CONSOLE_SCRIPTS[program], *argv])


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, FeatureDistillationArguments]:
    return StrictArgumentParser((ModelArguments, DataArguments, FeatureDistillationArguments)).parse(argv)


def check_arguments(
    model_args: ModelArguments, data_args: DataArguments, training_args: FeatureDistillationArguments, teachers: dict[str, TeacherEntry]
):
    """What can be checked without weights or data (after `check_command_line`), so that a mistake fails in a
    second, not after a download."""
    if data_args.shuffle_buffer < 0:
        raise UsageError(f"shuffle_buffer: must be >= 0 examples (0: no shuffling), got {data_args.shuffle_buffer}")
    if data_args.streaming and training_args.max_steps <= 0:
        raise UsageError("max_steps: a streamed dataset has no length; set --max_steps to a positive number of steps")
    for name, entry in teachers.items():
        folder = Path(entry.teacher_name_or_path).expanduser()
        if entry.image_processor_name_or_path is None and folder.is_dir():
            _check_teacher_folder(folder, entry_argument("teacher_name_or_path", "teacher", name, teachers))
    resuming = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir) is not None
    check_output_dir(training_args.output_dir, training_args.overwrite_output_dir, resuming)


def _check_teacher_folder(teacher: Path, argument: str) -> None:
    if not (teacher / "config.json").is_file():
        raise UsageError(f"{argument}: {teacher.name} holds no config.json; give a folder written by save_pretrained")
    timm = "architecture" in json.loads((teacher / "config.json").read_text())  # timm keeps preprocessing in config.json
    if not timm and not (teacher / "preprocessor_config.json").is_file():
        raise UsageError(
            f"{argument}: {teacher.name} has no preprocessor_config.json (the image mean, std and size the "
            "teacher was trained with); save the teacher's image processor there, pass image_processor_name_or_path "
            "FOLDER_OR_HUB_ID, or image_processor_name_or_path default for its model family's default processor"
        )


def load_image_processor(name_or_path: str | None, teacher_name_or_path: str, teacher, trust_remote_code: bool = False):
    """The image processor `name_or_path` names, by default the teacher's own.

    "default" builds the teacher family's own default (e.g. ViT: mean = std = 0.5; DINOv2: ImageNet
    statistics) at the teacher's image size: the convention checkpoints of that family ship with,
    which is what a teacher saved without its processor most likely expects.
    """
    name = name_or_path or teacher_name_or_path
    if name != "default":
        return AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    vit = resolve_vit(teacher)
    classes = IMAGE_PROCESSOR_MAPPING.get(type(vit.backbone.config), None)
    if classes is None:
        raise UsageError(f"image_processor_name_or_path: {vit.model_type} has no default image processor; name one")
    processor_class = classes["torchvision"] if isinstance(classes, dict) else classes
    size = {"height": vit.image_size, "width": vit.image_size}
    processor = processor_class(size=size)
    if getattr(processor, "do_center_crop", False):
        processor.crop_size = size
    return processor


def load_processors(model_args: ModelArguments, teachers: dict[str, TeacherEntry], models: dict) -> tuple[dict, object]:
    """Each teacher's image processor, and the students' (the first teacher's, or with several teachers the
    one --image_processor_name_or_path names)."""
    remote = model_args.trust_remote_code
    processors = {
        name: load_image_processor(entry.image_processor_name_or_path, entry.teacher_name_or_path, models[name], remote)
        for name, entry in teachers.items()
    }
    first = next(iter(teachers))
    if model_args.teachers is None or model_args.image_processor_name_or_path is None:
        return processors, processors[first]
    return processors, load_image_processor(model_args.image_processor_name_or_path, teachers[first].teacher_name_or_path, models[first], remote)


def teacher_settings(model_args: ModelArguments, teachers: dict[str, TeacherEntry], models: dict, processors: dict) -> dict | None:
    """With --teachers, each teacher's `TeacherSettings`: its entry's weight, layers and normalisation, and the
    statistics and size its own processor gives. None for the one --teacher_name_or_path."""
    if model_args.teachers is None:
        return None
    return {
        name: TeacherSettings.from_image_processor(processors[name], resolve_vit(models[name]).input_normalization, **entry.teacher_values())
        for name, entry in teachers.items()
    }


def check_models_fit(model_args: ModelArguments, teachers: dict[str, TeacherEntry], students: dict[str, StudentEntry]) -> None:
    """Teacher/student/layer compatibility from the configs and the image processors alone, for every
    teacher and student: the models are built on the meta device, no weights are read."""
    remote = model_args.trust_remote_code
    with torch.device("meta"):
        models = {
            name: AutoModel.from_config(AutoConfig.from_pretrained(entry.teacher_name_or_path, trust_remote_code=remote))
            for name, entry in teachers.items()
        }
        processors, images = load_processors(model_args, teachers, models)
    first = next(iter(teachers))
    image_size = image_processor_stats(images)[2]
    settings = teacher_settings(model_args, teachers, models, processors) or {first: TeacherSettings()}
    views = {name: resolve_vit(model, entry_argument("teacher_name_or_path", "teacher", name, teachers)) for name, model in models.items()}
    for name, entry in students.items():
        try:
            with torch.device("meta"):
                if entry.student_name_or_path is not None:
                    student = AutoModel.from_config(AutoConfig.from_pretrained(entry.student_name_or_path, trust_remote_code=remote))
                    built_for = resolve_vit(student, "student_name_or_path").image_size
                    if built_for != image_size:
                        whose = "teacher's" if len(teachers) == 1 else "students'"
                        raise UsageError(
                            f"student_name_or_path: the student is built for {built_for}px images but the "
                            f"{whose} image processor gives {image_size}px; "
                            "the saved student and its processor must agree"
                        )
                else:
                    student = load_student(entry, models[first], image_size)
            student = resolve_vit(student, "student")
            for teacher, view in views.items():
                try:
                    layers_argument = "teacher_layers" if len(teachers) == 1 else "layers"
                    plan_layers(view, student, distillation_config(entry), settings[teacher].layers, settings[teacher].image_size, layers_argument)
                except ValueError as error:
                    if len(teachers) == 1:
                        raise
                    raise UsageError(f"teachers entry {teacher!r}: {error}") from None
        except ValueError as error:  # UsageError included: which student, in a group
            if list(students) == [UNNAMED]:
                raise
            raise UsageError(f"students entry {name!r}: {error}") from None
        for teacher, view in views.items():
            larger = outgrown_teacher(view, student)
            if larger is not None:
                of = "its teacher" if len(teachers) == 1 else f"teacher {teacher!r}"
                logger.warning("student: %s is %s than %s; a distilled student is usually smaller", student_description(entry, student), larger, of)


def distillation_config(entry: StudentEntry) -> DistillationModelConfig:
    return DistillationModelConfig(**entry.method_values())


def load_student(student_args: StudentArguments, teacher, image_size: int, trust_remote_code: bool = False):
    """The student, built for `image_size` images: the size the teacher's image processor produces,
    which is saved with the student (`check_models_fit` has checked a given student's size)."""
    if student_args.student_name_or_path is not None:
        return AutoModel.from_pretrained(student_args.student_name_or_path, trust_remote_code=trust_remote_code, use_safetensors=True)
    hidden, heads = STUDENT_SIZES[student_args.student_size]
    geometry = resolve_vit(teacher, "teacher")
    config = transformers.ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=12,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=image_size,
        patch_size=geometry.patch_size,
        num_channels=geometry.num_channels,
        layer_norm_eps=1e-6,
    )
    if student_args.student_config_overrides:
        config.update_from_string(student_args.student_config_overrides)
        if config.image_size != image_size:
            raise UsageError(
                f"student_config_overrides: image_size={config.image_size} differs from the {image_size}px the "
                "teacher's image processor gives; the saved student and its processor must agree"
            )
    student = transformers.ViTModel(config)
    with torch.no_grad():  # distillation never trains the pooler: saved zeroed, it cannot pass for a feature
        for parameter in student.pooler.parameters():
            parameter.zero_()
    return student


def open_split(data_args: DataArguments, training_args: FeatureDistillationArguments, split: str, train: bool):
    """A split, images not yet decoded: opened before the models so that a wrong column fails first."""
    dataset = load_image_dataset(
        data_args.dataset_name,
        data_args.dataset_config,
        split,
        data_args.image_column,
        streaming=data_args.streaming,
        shuffle_buffer=data_args.shuffle_buffer if train else 0,
        seed=training_args.seed,
    )
    count = data_args.max_train_samples if train else data_args.max_eval_samples
    if count is not None:
        dataset = dataset.take(count) if data_args.streaming else dataset.select(range(min(count, len(dataset))))
    return dataset


def with_transforms(dataset, data_args: DataArguments, image_processor, train: bool, seed: int):
    """uint8 `pixel_values` at the image processor's size (SingerTrainer normalises each batch on the device):
    augmented for training, from a seed per example (see `ImageTransform`; its epoch must be kept up to date),
    resized and centre-cropped for evaluation."""
    mean, std, image_size = image_processor_stats(image_processor)
    transform = ImageTransform(
        build_transforms(mean, std, image_size, train=train, normalize=False), data_args.image_column, seed=seed if train else None
    )
    return with_image_transform(dataset, transform), transform


def student_description(student_args: StudentArguments, student: ResolvedViT) -> str:
    """What the student is, after any --student_config_overrides: "ViT (4 blocks, width 64) from scratch", or the
    model started from (a local folder by its name only) with its type and shape."""
    shape = f"{student.depth} blocks, width {student.width}"
    if student_args.student_name_or_path is None:
        return f"ViT ({shape}) from scratch"
    return f"{public_name(student_args.student_name_or_path)} ({student.model_type}, {shape})"


def title(model: DistillationModel) -> str:
    """The run's first log line: the method, or what the group of students and teachers is."""
    methods = {name: model.methods[name][next(iter(model.teachers))].label for name in model.students}
    several = len(model.teachers) > 1
    if len(methods) == 1:
        return f"{next(iter(methods.values()))} distillation" + (f" from {len(model.teachers)} teachers" if several else "")
    labels = ", ".join(f"{name} ({label})" for name, label in methods.items())
    source = f"one pass of {len(model.teachers)} teachers" if several else "one teacher pass"
    return f"Distillation of {len(methods)} students from {source}: {labels}"


def describe(
    model: DistillationModel, teachers: dict[str, TeacherEntry], students: dict[str, StudentEntry], data_args: DataArguments,
    training_args: FeatureDistillationArguments,
) -> str:
    count = lambda module, trainable=True: sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)  # noqa: E731
    several = len(model.teachers) > 1
    lines = [f"Teachers ({len(model.teachers)}), each frozen, run once per step:"] if several else []
    for name, teacher_model in model.teachers.items():
        teacher, size = resolve_vit(teacher_model), model.teacher_image_sizes[name]
        resized = f", run at {size}px" if teacher.image_size != size else ""
        settings = model.teacher_settings[name]
        part = f"; weight {settings.weight:g}, KD targets {'as they are' if settings.normalization == 'none' else settings.normalization}"
        lines.append(
            (f"  {name}: " if several else "Teacher: ")
            + f"{teachers[name].teacher_name_or_path} ({teacher.model_type}, {teacher.depth} blocks, width {teacher.width}, "
            f"prefix tokens {teacher.num_prefix_tokens}, built for {teacher.image_size}px{resized}, patch {teacher.patch_size}"
            + (f"; {count(teacher_model, False):,} parameters{part}" if several else "")
            + ")"
        )
    group = len(model.students) > 1
    for name, student_model in model.students.items():
        student, config = resolve_vit(student_model), model.configs[name]
        indent = "  " if group else ""
        regridded = [t for t, method in model.methods[name].items() if method.alignment.student_grid != method.alignment.teacher_grid]
        lines += [
            (f"Student {name}" if group else "Student") + f": {student_description(students[name], student)}, "
            f"{model.image_size}px, patch {student.patch_size}"
            + (f"; KD resamples its patch tokens onto the grid of {'the teacher' if not several else ', '.join(regridded)}" if regridded else ""),
        ]
        adapter_count = 0
        for teacher_name, method in model.methods[name].items():
            teacher = resolve_vit(model.teachers[teacher_name])
            blocks = ", ".join(f"{t}→{s}" for t, s in zip(method.teacher_layers, method.student_layers))
            lines.append(f"{indent}Method: {config.method}; " + (f"teacher {teacher_name}" if several else "teacher") + f" → student blocks: {blocks}")
            adapter_name = model.adapter_name(name)
            adapters = {layer: adapter for layer, adapter in model.adapter_layers(teacher_name).items() if adapter_name in adapter.singer_down}
            for layer, adapter in adapters.items():
                found = adapter.nullspace_row_count[adapter_name]
                rank = adapter.singer_down[adapter_name].shape[1]
                source = basis_block(layer, method.teacher_layers)
                gated = teacher.mlp(source).gated  # a gated MLP's value path is read with the relative rule
                threshold = f"τ·σ_max (τ={config.null_threshold})" if gated else f"τ={config.null_threshold}"
                lines.append(
                    f"{indent}  adapter on block {layer}: {found}/{rank} nullspace directions below {threshold} "
                    f"(block {source}'s {'gated ' if gated else ''}MLP), {rank - found} random"
                )
                adapter_count += adapter.singer_down[adapter_name].numel() + adapter.singer_up[adapter_name].numel()
        frozen = count(student_model, False)
        lines.append(
            f"{indent}Trainable parameters: student {count(student_model):,}, projectors/heads {count(model.methods[name]):,}"
            + (f", adapters {adapter_count:,}" if adapter_count else "")
            + ("" if group or several else f"; teacher frozen {count(model.teacher, False):,}")
            + (f"; student frozen (no loss reaches them) {frozen:,}" if frozen else "")
        )
    if group and not several:
        lines.append(f"Teacher frozen {count(model.teacher, False):,} parameters, run once per step for the {len(model.students)} students")
    lines.append(f"Data: {data_args.dataset_name} [{data_args.train_split}], streaming={data_args.streaming}")
    if data_args.streaming and data_args.shuffle_buffer:
        buffers = max(training_args.dataloader_num_workers, 1)  # one per worker; the main process's with none
        gigabytes = data_args.shuffle_buffer * buffers * IMAGENET_JPEG_BYTES / 1e9
        lines.append(
            f"  shuffle buffer: {data_args.shuffle_buffer:,} encoded examples in each of {buffers} DataLoader worker(s) of "
            f"each process; ~{gigabytes:.1f} GB per process for ImageNet-sized JPEGs (~110 KB each)"
        )
    return "\n".join(lines)


def build_students(students: dict[str, StudentEntry], teacher, image_size: int, trust_remote_code: bool) -> dict:
    """Every student, each built from the same random state, as it would be alone. What is built next (each
    student's heads, which `DistillationModel` builds from the one state it finds) starts from a state
    drawn from that start, not from where building left it, which depends on the student's size: so a
    student's heads, and then its training, are the same in any group as alone."""
    start = torch.get_rng_state()
    models = {}
    for name, entry in students.items():
        torch.set_rng_state(start)
        models[name] = load_student(entry, teacher, image_size, trust_remote_code)
    torch.set_rng_state(start)
    torch.manual_seed(int(torch.randint(0, 2**62, ())))
    return models


def main(argv: list[str] | None = None, *, command_line_checked: bool = False) -> dict:
    """The run; `command_line_checked`: `check_command_line(argv)` has already passed (this script's start)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    if not command_line_checked:
        check_command_line(argv)
    model_args, data_args, training_args = parse_arguments(argv)
    logging.getLogger("singer_hf").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    students = run_students(model_args, training_args)
    teachers = run_teachers(model_args, students)
    check_arguments(model_args, data_args, training_args, teachers)
    repo_ids = check_hub_repos(training_args, list(students)) if training_args.push_to_hub and training_args.should_save else None
    check_models_fit(model_args, teachers, students)
    collator = PixelValuesCollator(data_args.image_column, data_args.max_bad_image_share, data_args.bad_image_window)
    dataset = open_split(data_args, training_args, data_args.train_split, train=True)
    eval_dataset = None if data_args.eval_split is None else open_split(data_args, training_args, data_args.eval_split, train=False)

    teacher_models = {
        name: load_backbone(entry.teacher_name_or_path, trust_remote_code=model_args.trust_remote_code, use_safetensors=True)
        for name, entry in teachers.items()
    }
    processors, image_processor = load_processors(model_args, teachers, teacher_models)
    first = resolve_vit(next(iter(teacher_models.values())))
    settings = teacher_settings(model_args, teachers, teacher_models, processors)
    models = build_students(students, first.backbone, image_processor_stats(image_processor)[2], model_args.trust_remote_code)
    configs = {name: distillation_config(entry) for name, entry in students.items()}
    model = DistillationModel(
        teacher_models if settings is not None else teacher_models[UNNAMED], models, configs, teacher_settings=settings,
        image_statistics=None if settings is None else image_processor_stats(image_processor, first.input_normalization)[:2],
    )  # fmt: skip
    logger.info("%s\n%s", title(model), describe(model, teachers, students, data_args, training_args))

    train_dataset, augmentation = with_transforms(dataset, data_args, image_processor, train=True, seed=training_args.seed)
    if eval_dataset is not None:
        eval_dataset, _ = with_transforms(eval_dataset, data_args, image_processor, train=False, seed=training_args.seed)
    if data_args.streaming:
        # Each process reads its own share of the stream instead of the main process reading and
        # dispatching every batch. Accelerate splits a `datasets` stream by files when it has at
        # least one shard per process (what `split_dataset_by_node` does), by batches otherwise; a
        # split here as well would split twice and drop data (tests/test_multiprocess.py).
        training_args.accelerator_config.dispatch_batches = False
    trainer = FeatureDistillationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[EpochCallback(augmentation)],
        processing_class=student_image_processor(image_processor, first.input_normalization),
    )
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)  # "true": the last
    if checkpoint is None and training_args.overwrite_output_dir and trainer.is_world_process_zero():
        clear_previous_run(training_args.output_dir)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.preempted:
        step, signal_name = trainer.state.global_step, trainer.preempted
        stopped_by = "Ctrl-C (SIGINT)" if signal_name == "SIGINT" else signal_name
        resume = printed_command("distill", resume_arguments(argv))
        print(f"error: stopped by {stopped_by} at step {step} after writing checkpoint-{step} to {training_args.output_dir}; "
              f"resume with: {resume}", file=sys.stderr)  # fmt: skip
        raise SystemExit(130 if signal_name == "SIGINT" else 143)  # 128 + the signal, as a shell or scheduler expects
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.create_model_card(
        finetuned_from={name: entry.teacher_name_or_path for name, entry in teachers.items()}, dataset=data_args.dataset_name,
        students={name: student_description(students[name], resolve_vit(student)) for name, student in model.students.items()},
    )  # fmt: skip
    last_log = next((entry for entry in reversed(trainer.state.log_history) if "loss" in entry), {})
    losses = {name: value for name, value in last_log.items() if name.startswith("loss")}
    if training_args.should_log:
        folders = [folder.resolve() for folder in trainer.student_folders()]
        saved = []
        for name, folder in zip(model.students, folders):
            adapters = any(method.adapter_config(model.configs[name], method.teacher_layers) for method in model.methods[name].values())
            artefacts = "adapters and projectors" if adapters else "projectors and heads"
            saved.append(f"{folder} ({artefacts} in {folder / DISTILLATION_DIR})")
        print(
            f"\nDone: {result.global_step} steps, last logged losses {losses}\n"
            + (f"Student saved to {saved[0]}.\n" if len(saved) == 1 else "Students saved, each a model folder of its own:\n" + "".join(f"    {line}\n" for line in saved))
            + f"Load {'it' if len(saved) == 1 else 'one'} with:\n"
            f"    from transformers import AutoModel, AutoImageProcessor\n"
            f'    model = AutoModel.from_pretrained("{folders[0]}")\n'
            f'    processor = AutoImageProcessor.from_pretrained("{folders[0]}")'
        )
    if repo_ids is not None and trainer.is_world_process_zero():
        try:
            published = trainer.push_to_hub()
        except PublishError as error:
            token = "HF_TOKEN=<your token> " if training_args.hub_token else ""
            commands = []
            for repo_id, folder in zip(repo_ids.values(), trainer.student_folders()):
                publish = [str(folder), "--repo_id", repo_id]
                publish += ["--private", "true"] if training_args.hub_private_repo else []
                publish += ["--revision", training_args.hub_revision] if training_args.hub_revision else []
                commands.append(f"    {token}{printed_command('push_to_hub', publish)}")
            saved = "the student is" if len(commands) == 1 else "the students are"
            print(f"error: {error.reason}; {saved} saved in {training_args.output_dir}, nothing was published. "
                  f"Publish {'it' if len(commands) == 1 else 'each'} with:\n" + "\n".join(commands), file=sys.stderr)  # fmt: skip
            raise SystemExit(1) from None
        print(f"Published to {', '.join(published)}")
    return {"output_dir": training_args.output_dir, "metrics": result.metrics, "losses": losses}


def resume_arguments(argv: list[str]) -> list[str]:
    """`argv` set to resume from the last checkpoint of its output_dir."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--resume_from_checkpoint", "--resume-from-checkpoint"):
            skip = True
        elif not token.startswith(("--resume_from_checkpoint=", "--resume-from-checkpoint=")):
            kept.append(token)
    return [*kept, "--resume_from_checkpoint", "true"]


def check_hub_repos(training_args: FeatureDistillationArguments, students: list[str]) -> dict[str, str]:
    """--push_to_hub: the token, each student's repo and the Hub checked before anything is trained
    (`check_publishable`); each student's full repo id."""
    base = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    repo_ids = {}
    for name, repo_id in student_repo_ids(base, students).items():
        try:
            repo_ids[name] = check_publishable(repo_id, token=training_args.hub_token, private=training_args.hub_private_repo)
        except ValueError as error:  # the repo id
            named = "" if training_args.hub_model_id else " (output_dir's name: set --hub_model_id)"
            raise UsageError(f"hub_model_id: {error}{named}") from None
        except PublishError as error:
            raise UsageError(f"push_to_hub: {error.reason}; nothing was trained") from None
    return repo_ids


if __name__ == "__main__":
    run_cli(main)
