"""`DistillationModel`: a frozen ViT teacher, an HF student, and the method that distils one into the other."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import peft
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from transformers.utils import ModelOutput

from .alignment import TokenAlignment
from .architectures import BlockOutputs, ResolvedViT, backbone_of, resolve_vit
from .artifacts import ArtifactViews
from .checks import channel_values, check_fields, checked_field, integer_at_least
from .data import image_processor_stats
from .methods import DistillationMethod, MethodFields, get_method
from .fields import TeacherFields
from .normalization import FeatureMoments, TargetNormalization
from .tuner import SingerConfig, SingerModel


@dataclass
class DistillationModelConfig(MethodFields):
    """What to distil and how (the fields are declared in `methods.MethodFields` and the adapter's
    `tuner.config.AdapterFields`). `None` fields take the method's defaults: its teacher layers scaled
    to the teacher's depth (SiNGER on ViT-L: [17, 23]) and its loss weights. Students get one block per
    teacher block by Hungarian assignment (`map_layers`)."""

    def __post_init__(self):
        check_fields(self)
        get_method(self.method)  # a registered method
        if self.teacher_layers is not None:
            self.teacher_layers = sorted(self.teacher_layers)

    @property
    def method_class(self) -> type[DistillationMethod]:
        return get_method(self.method)

    def layers_for(self, teacher_depth: int) -> list[int]:
        """`teacher_layers`, or the method's default for a teacher of this depth."""
        return list(self.teacher_layers) if self.teacher_layers is not None else self.method_class.default_layers(teacher_depth)

    def weights(self) -> dict[str, float]:
        """The weight of each of the method's loss terms, defaults filled in."""
        return self.method_class.weights(self)

    # The parts of `PretrainedConfig` that the Trainer and its logging callbacks (tensorboard, wandb,
    # mlflow, ...) read from `model.config`.
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def map_layers(teacher_layers: list[int], teacher_depth: int, student_depth: int) -> list[int]:
    """Student block for each teacher block: Hungarian assignment on |l/L_T − j/(L_S−1)|.

    Kept as the official code does it, quirk included: for equal depths the last student block can
    go unused (12→12 maps [5, 11] to [5, 10]).
    """
    if len(teacher_layers) > student_depth:
        raise ValueError(
            f"teacher_layers: {len(teacher_layers)} teacher layers cannot map one-to-one onto a "
            f"{student_depth}-block student; give at most {student_depth}"
        )
    teacher_position = torch.tensor(teacher_layers, dtype=torch.float64) / teacher_depth
    student_position = torch.arange(student_depth, dtype=torch.float64) / max(student_depth - 1, 1)
    cost = (teacher_position[:, None] - student_position[None, :]).abs().numpy()
    rows, columns = linear_sum_assignment(cost)
    return [int(column) for _, column in sorted(zip(rows, columns))]


def plan_layers(
    teacher: ResolvedViT,
    student: ResolvedViT,
    config: DistillationModelConfig,
    teacher_layers: list[int] | None = None,
    teacher_image_size: int | None = None,
    layers_argument: str = "teacher_layers",
) -> tuple[list[int], list[int]]:
    """(teacher blocks, student blocks) to distil, after checking that the two models fit together;
    `teacher_layers` (default: the config's, else the method's) chooses the teacher blocks, and
    `teacher_image_size` the size the teacher reads (default: the student's); errors about the blocks
    name `layers_argument`.

    Needs only the models' structure, not their weights: scripts run it on models built on the meta
    device to fail before anything is downloaded or loaded.
    """
    _check_compatible(teacher, student, teacher_image_size)
    teacher_layers = list(teacher_layers) if teacher_layers is not None else config.layers_for(teacher.depth)
    teacher.check_blocks(teacher_layers, layers_argument)
    config.method_class.check_teacher(teacher, teacher_layers)
    return teacher_layers, map_layers(teacher_layers, teacher.depth, student.depth)


def outgrown_teacher(teacher: ResolvedViT, student: ResolvedViT) -> str | None:
    """How the student is larger than its teacher ("deeper (8 vs 6 blocks) and wider (width 256 vs 128)"),
    or None. Such a pair trains, but is rarely meant: a student gains nothing by mimicking a smaller model,
    and its blocks after the deepest distilled one get no training signal."""
    larger = []
    if student.depth > teacher.depth:
        larger.append(f"deeper ({student.depth} vs {teacher.depth} blocks)")
    if student.width > teacher.width:
        larger.append(f"wider (width {student.width} vs {teacher.width})")
    return " and ".join(larger) or None


@dataclass
class TeacherSettings(TeacherFields):
    """How one teacher takes part when a student learns from several (agglomerative distillation):
    its share of the loss, its blocks, the normalisation of its KD targets (`fields.TeacherFields`), and
    the images it reads (its own processor's statistics and size; the students' images re-normalised
    and resized on the device, see `DistillationModel.teacher_pixels`)."""

    image_mean: list[float] | None = checked_field(
        None, help="The per-channel mean its image processor normalises with; default: the students'.", check=channel_values(positive=False)
    )
    image_std: list[float] | None = checked_field(
        None, help="The per-channel std its image processor normalises with; default: the students'.", check=channel_values(positive=True)
    )
    image_size: int | None = checked_field(
        None, help="The image size it reads (the students' images resized); default: the students'.", check=integer_at_least(1, optional=True)
    )

    def __post_init__(self):
        check_fields(self)
        if self.layers is not None:
            self.layers = sorted(self.layers)
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError("image_mean: give this teacher's image_mean and image_std together (or neither)")
        if self.image_mean is not None and len(self.image_mean) != len(self.image_std):
            raise ValueError(f"image_std: {len(self.image_std)} channels, image_mean has {len(self.image_mean)}")

    @classmethod
    def from_image_processor(cls, image_processor, input_normalization=None, **settings) -> TeacherSettings:
        """Settings whose image statistics and size are those `image_processor` gives (`data.image_processor_stats`;
        `input_normalization`: the (mean, std) a teacher normalises with inside its forward, `ResolvedViT.input_normalization`)."""
        mean, std, size = image_processor_stats(image_processor, input_normalization)
        return cls(image_mean=mean, image_std=std, image_size=size, **settings)


@dataclass
class DistillationOutput(ModelOutput):
    """`loss`: the weighted total to minimise; `losses`: each term, unweighted, as the method sums it.

    With one student and one teacher the terms are named as the method names them (`kd`, `outlier`,
    ...); with several, by student and/or teacher (`tiny/kd`, `tiny/dinov3/kd`), and each student's
    weighted total is `<student>/total`.
    """

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    artifacts: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Pair:
    """One student distilled from one teacher by one method."""

    student: str
    teacher: str
    method: DistillationMethod

    @property
    def teacher_layers(self) -> list[int]:
        return self.method.teacher_layers

    @property
    def student_layers(self) -> list[int]:
        return self.method.student_layers


DEFAULT_NAME = "default"
"""The name of the one teacher or student given without a name (and of the one student's PEFT adapters)."""


class DistillationModel(nn.Module):
    """Frozen teachers (eval mode), students, and the methods that distil each teacher into each student.

    `DistillationModel(teacher, student, config)` distils one teacher into one student. Several
    students (a family, or a comparison of methods) learn from one teacher pass when `student` and
    `config` map names to models and configs; several teachers (each with its `TeacherSettings`)
    teach every student when `teacher` maps names to models. Every student learns from every
    teacher, through its own method's heads and, for SiNGER, its own PEFT adapters on each teacher
    (one named adapter per student); the students share nothing trainable, so each trains exactly as
    it would alone.

    Each teacher reads the students' images as its own processor would give them
    (`teacher_pixels`), and its KD targets may be normalised (`TeacherSettings.normalization`, fitted
    by `fit_target_normalization` before training; the statistics are buffers of this model, so
    checkpoints carry them).

    `forward(pixel_values)` runs each teacher once without gradients, up to the deepest block any
    student reads, each student with gradients, and returns the weighted total and every term.
    Gradients reach SiNGER's adapters through the frozen teacher block l+1 of the
    information-preservation loss; the teachers' own weights never get any.

    Student parameters that no loss reaches (the final norm and pooler, blocks after the deepest
    distilled one, DINOv2's mask token) are frozen (`frozen_student_parameters`): every trainable
    parameter then gets a gradient at every step, so DDP runs without `find_unused_parameters`.
    They keep their values and are saved with the student; a student loaded from the saved folder
    has them trainable again.

    The model's state (`state_dict`, what a checkpoint holds) is what trains — students, heads,
    adapters — without the frozen teachers' own weights: those are the teachers given to the
    constructor, never saved, and taken as they are when a state is loaded.
    """

    # Each loss is a per-batch mean; the Trainer must divide it by the accumulation steps itself
    # (transformers 5 would otherwise assume `**kwargs` means "normalised by num_items_in_batch").
    accepts_loss_kwargs = False

    def __init__(
        self,
        teacher: nn.Module | Mapping[str, nn.Module],
        student: nn.Module | Mapping[str, nn.Module],
        config: DistillationModelConfig | Mapping[str, DistillationModelConfig] | None = None,
        teacher_settings: Mapping[str, TeacherSettings] | None = None,
        image_statistics: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        """`image_statistics`: the (mean, std) the `pixel_values` given to `forward` are normalised with
        (the students' image processor); needed when a teacher has its own `image_mean` and `image_std`."""
        super().__init__()
        teachers, students = _named(teacher, "teacher"), _named(student, "student")
        configs = _per_student(config, students)
        settings = {name: TeacherSettings() for name in teachers} | dict(teacher_settings or {})
        if unknown := sorted(set(settings) - set(teachers)):
            raise ValueError(f"teacher_settings: {unknown} name no teacher (teachers: {sorted(teachers)})")
        if len(teachers) > 1 and (given := [name for name, c in configs.items() if c.teacher_layers is not None]):
            raise ValueError(
                f"teacher_layers: with several teachers, give each teacher's layers in its TeacherSettings (set for students {given})"
            )
        if image_statistics is None and (own := [name for name, s in settings.items() if s.image_mean is not None]):
            raise ValueError(
                f"image_statistics: teachers {own} have their own image_mean and image_std; give the (mean, std) the "
                "students' pixel_values are normalised with, so their images can be re-normalised"
            )
        self.configs, self.teacher_settings = configs, settings
        self.image_statistics = None if image_statistics is None else (list(image_statistics[0]), list(image_statistics[1]))

        teacher_views = {}
        for name, model in teachers.items():
            if not isinstance(model, peft.PeftModel):
                teachers[name] = model = backbone_of(model)  # no task head, no text tower: only what distillation reads
            _check_not_meta(model, _argument("teacher", name, teachers))
            teacher_views[name] = resolve_vit(model, _argument("teacher", name, teachers))
        student_views = {name: resolve_vit(model, _argument("student", name, students)) for name, model in students.items()}
        sizes = {name: view.image_size for name, view in student_views.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"student: the students are built for different image sizes {sizes}; students trained together read the same images")
        # Images come at the students' size (a saved student and its processor must agree); a teacher
        # reads them at that size or at its TeacherSettings.image_size (resized, `teacher_pixels`),
        # interpolating its position embeddings if built for another.
        self.image_size = next(iter(sizes.values()))
        self.teacher_image_sizes = {name: settings[name].image_size or self.image_size for name in teachers}

        plans = {}  # (student, teacher) → (teacher layers, student layers)
        for student_name, student_view in student_views.items():
            for teacher_name, teacher_view in teacher_views.items():
                layers = settings[teacher_name].layers or configs[student_name].teacher_layers
                plans[student_name, teacher_name] = plan_layers(
                    teacher_view, student_view, configs[student_name], layers, self.teacher_image_sizes[teacher_name]
                )
        for teacher_name, teacher_view in teacher_views.items():
            teacher_view.run_at(self.teacher_image_sizes[teacher_name], _argument("teacher", teacher_name, teachers))
            model = teachers[teacher_name]
            adapters = {}
            for student_name in students:
                config = configs[student_name]
                adapter_config = config.method_class.adapter_config(config, plans[student_name, teacher_name][0])
                if adapter_config is not None:
                    adapters[student_name] = adapter_config
            for student_name, adapter_config in adapters.items():
                model = _with_adapter(model, self.adapter_name(student_name), adapter_config)
            # Only the students' adapters train; a PeftModel loaded for inference has them frozen.
            model.requires_grad_(False)
            if adapters:
                model.base_model.set_requires_grad([self.adapter_name(name) for name in adapters], True)
            teachers[teacher_name] = model
            teacher_views[teacher_name] = resolve_vit(model, _argument("teacher", teacher_name, teachers))
        self.teachers, self.students = nn.ModuleDict(teachers), nn.ModuleDict(students)
        self._teacher_views, self._student_views = teacher_views, student_views
        self._frozen = {name: self._freeze_unreached_student_parameters(name, plans) for name in students}

        # A teacher's KD-target normalisation, one per block any student distils from it (shared by
        # the students: the statistics are the teacher's); identity until fitted.
        self.target_normalizations = nn.ModuleDict()
        for teacher_name, teacher_view in teacher_views.items():
            if settings[teacher_name].normalization != "none":
                layers = sorted({layer for (_, t), (teacher_layers, _) in plans.items() if t == teacher_name for layer in teacher_layers})
                self.target_normalizations[teacher_name] = nn.ModuleDict({str(layer): TargetNormalization(teacher_view.width) for layer in layers})

        # Each student's heads start as they would if it were built alone: from the random state the
        # construction began with (the students then train identically alone and in a group).
        start = torch.get_rng_state()
        after_first = None
        methods = {}
        for student_name in students:
            torch.set_rng_state(start)
            config = configs[student_name]
            methods[student_name] = nn.ModuleDict()
            for teacher_name in teachers:
                method = config.method_class(config, teacher_views[teacher_name], student_views[student_name], *plans[student_name, teacher_name])
                if method.adapter_config(config, method.teacher_layers) is not None:
                    method.bind_adapters(self.teachers[teacher_name].base_model.singer_layers, self.adapter_name(student_name))
                if self.teacher_image_sizes[teacher_name] != self.image_size:
                    method.alignment = TokenAlignment.between(
                        student_views[student_name], teacher_views[teacher_name], self.image_size, self.teacher_image_sizes[teacher_name]
                    )
                if teacher_name in self.target_normalizations:
                    method.bind_target_normalization({int(layer): module for layer, module in self.target_normalizations[teacher_name].items()})
                methods[student_name][teacher_name] = method
            after_first = after_first if after_first is not None else torch.get_rng_state()
        torch.set_rng_state(after_first)
        self.methods = nn.ModuleDict(methods)
        self.pairs = [Pair(s, t, self.methods[s][t]) for s in students for t in teachers]
        for model in self.teachers.values():
            model.eval()
        self.register_state_dict_post_hook(_drop_frozen_teacher_weights)
        self.register_load_state_dict_pre_hook(_take_frozen_teacher_weights)

    # -- one teacher, one student: the usual case, by its usual names -----------------------------
    def _only(self, kind: str, names) -> str:
        names = list(names)
        if len(names) != 1:
            raise AttributeError(f"{kind}: this model has several {kind}s ({names}); use model.{kind}s[name]")
        return names[0]

    @property
    def teacher(self) -> nn.Module:
        return self.teachers[self._only("teacher", self.teachers)]

    @property
    def student(self) -> nn.Module:
        return self.students[self._only("student", self.students)]

    @property
    def pair(self) -> Pair:
        if len(self.pairs) != 1:
            raise AttributeError(f"pair: this model distils {len(self.pairs)} student/teacher pairs; use model.pairs")
        return self.pairs[0]

    @property
    def method(self) -> DistillationMethod:
        return self.pair.method

    @property
    def config(self) -> DistillationModelConfig | DistillationGroupConfig:
        """The one student's config, or every student's and teacher's settings (what logging integrations record)."""
        if len(self.configs) == 1 and len(self.teachers) == 1:
            return next(iter(self.configs.values()))
        return DistillationGroupConfig(students=dict(self.configs), teachers=dict(self.teacher_settings))

    @property
    def teacher_layers(self) -> list[int]:
        return self.pair.teacher_layers

    @property
    def student_layers(self) -> list[int]:
        return self.pair.student_layers

    @property
    def adapters(self) -> dict[int, nn.Module]:
        """The one teacher's adapter layers by block, for methods that train adapters (else empty)."""
        return self.adapter_layers(self._only("teacher", self.teachers))

    def adapter_layers(self, teacher: str) -> dict[int, nn.Module]:
        """Teacher `teacher`'s adapter layers by block (each holding every student's adapter), else empty."""
        model = self.teachers[teacher]
        return model.base_model.singer_layers if isinstance(model, peft.PeftModel) else {}

    @property
    def frozen_student_parameters(self) -> list[str]:
        return self._frozen[self._only("student", self.students)]

    @staticmethod
    def adapter_name(student: str) -> str:
        """The name of `student`'s PEFT adapters on each teacher (methods that train adapters): the student's
        name, unless PEFT would mistake it for part of its parameter prefix (`singer_`; a student named "singer")."""
        return student if student not in SingerModel.prefix else f"{student}_adapter"

    # -- nn.Module and the Trainer's model protocol -----------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        for teacher in self.teachers.values():
            teacher.eval()  # a teacher is a fixed target: no dropout, no drop-path
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs) -> None:
        """Checkpoint the students' blocks (`--activation_checkpointing`); the teachers keep no activations anyway."""
        for name, student in self.students.items():
            if not getattr(student, "supports_gradient_checkpointing", False):
                raise ValueError(f"activation_checkpointing: {type(student).__name__} students do not support it")
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        for student in self.students.values():
            student.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return all(getattr(student, "is_activation_checkpointing", False) for student in self.students.values())

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, return_loss: bool = True, artifact_stats: bool = False, **unused) -> DistillationOutput:
        """The weighted total and every term; with `artifact_stats`, also the batch's artifact
        statistics of the features the losses compared (`DistillationOutput.artifacts`)."""
        views = {} if artifact_stats else None
        total, losses = self._distil(pixel_values, views)
        artifacts = None
        if views is not None:
            artifacts = {}
            for prefix, recorded in views.items():
                artifacts.update({f"{prefix}/{key}" if prefix else key: value for key, value in recorded.statistics().items()})
        return DistillationOutput(loss=total, losses=losses, artifacts=artifacts)

    @torch.no_grad()
    def artifact_norms(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Patch norms (B×P) of every view the losses compare, by `[<student>/][<teacher>/]<view>/<layer>`
        (names as in `DistillationOutput.artifacts`), in eval mode: for figures of fixed images."""
        training = self.training
        self.eval()
        try:
            views = {}
            self._distil(pixel_values, views)
        finally:
            self.train(training)
        return {
            "/".join([*filter(None, [prefix]), view, str(layer)]): norms
            for prefix, recorded in views.items()
            for (view, layer), norms in recorded.norms.items()
        }

    def _distil(self, pixel_values: torch.Tensor, views: dict[str, ArtifactViews] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total and the terms; each pair's compared features into `views` when given, the
        teacher's own view once per teacher (keyed by its name only)."""
        self._check_pixel_values(pixel_values)
        teacher_features = {name: self.teacher_features(pixel_values, name) for name in self.teachers}
        several_students, several_teachers = len(self.students) > 1, len(self.teachers) > 1
        total, losses = 0, {}
        for student_name in self.students:
            student_features = self.student_features(pixel_values, student_name)
            student_total = 0
            for teacher_name, method in self.methods[student_name].items():
                prefix = "/".join([student_name] * several_students + [teacher_name] * several_teachers)
                if views is None or not _takes_views(type(method)):
                    terms = method.losses(teacher_features[teacher_name], student_features)
                else:
                    recorded = views[prefix] = ArtifactViews()
                    terms = method.losses(teacher_features[teacher_name], student_features, recorded)
                    teacher_views = views.setdefault(teacher_name if several_teachers else "", ArtifactViews())
                    for key in [key for key in recorded.norms if key[0] == "teacher"]:
                        teacher_views.norms.setdefault(key, recorded.norms.pop(key))
                weights = method.weights(method.config)
                pair_total = sum(weights[term] * value for term, value in terms.items())
                student_total = student_total + self.teacher_settings[teacher_name].weight * pair_total
                losses.update({f"{prefix}/{term}" if prefix else term: value for term, value in terms.items()})
            if several_students:
                losses[f"{student_name}/total"] = student_total
            total = total + student_total
        return total, losses

    def teacher_features(self, pixel_values: torch.Tensor, teacher: str | None = None) -> BlockOutputs:
        """A teacher's block outputs up to the deepest block any student reads (SiNGER's F^{l+1}
        targets are all at or before its final layer), without gradients."""
        name = teacher or self._only("teacher", self.teachers)
        view = self._teacher_views[name]
        last = max(pair.teacher_layers[-1] for pair in self.pairs if pair.teacher == name)
        with torch.no_grad():
            pixels = self.teacher_pixels(pixel_values, name)
            return view.block_outputs(pixels.to(next(view.blocks[0].parameters()).dtype), last_block=last)

    def teacher_pixels(self, pixel_values: torch.Tensor, teacher: str | None = None) -> torch.Tensor:
        """The students' images (normalised with `image_statistics`) as teacher `teacher` reads them:
        re-normalised with its own `image_mean`/`image_std` and resized (bilinear, antialiased) to its
        own `image_size`, on the device; unchanged where its settings match the students'.

        The batch was augmented once, so every teacher and student sees the same crop; resizing and
        per-channel normalisation commute (both linear), so this is what the teacher's processor gives
        for that crop, up to its uint8 rounding."""
        name = teacher or self._only("teacher", self.teachers)
        settings = self.teacher_settings[name]
        pixels = pixel_values
        if settings.image_mean is not None and (settings.image_mean, settings.image_std) != tuple(self.image_statistics):
            # (x·s + m − m_t) / s_t, one affine map per channel: back to [0, 1] and to the teacher's statistics at once.
            mean, std = self.image_statistics
            shift = [(teacher_mean - m) / s for teacher_mean, m, s in zip(settings.image_mean, mean, std)]
            pixels = TF.normalize(pixels, mean=shift, std=[teacher_std / s for teacher_std, s in zip(settings.image_std, std)])
        size = self.teacher_image_sizes[name]
        if size != pixels.shape[-1]:
            pixels = TF.resize(pixels, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        return pixels

    @property
    def needs_target_normalization(self) -> bool:
        """Whether a teacher's target normalisation is still to be fitted (`fit_target_normalization`)."""
        return any(not module.fitted for modules in self.target_normalizations.values() for module in modules.values())

    @torch.no_grad()
    def fit_target_normalization(
        self, batches: Iterable[torch.Tensor | Mapping], reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> int:
        """Estimates every normalised teacher's statistics from its UNREFINED block outputs on `batches`
        (`pixel_values` tensors, or batches holding them, normalised as `forward` takes them) and fits
        its `TargetNormalization`s; returns the number of images read.

        With several processes, pass `reduce_sum` (a sum across ranks, `accelerator.reduce(t, "sum")`):
        the moments of every rank's batches are summed, so every rank fits the same statistics. The
        trainer calls this at the start of a fresh run (`FeatureDistillationTrainer.train`); a resumed
        run takes the fitted statistics from its checkpoint.
        """
        moments = {
            (teacher, layer): FeatureMoments(module.mean.numel())
            for teacher, modules in self.target_normalizations.items()
            for layer, module in modules.items()
        }
        images = 0
        for batch in batches:
            pixel_values = batch["pixel_values"] if isinstance(batch, Mapping) else batch
            images += pixel_values.shape[0]
            for teacher in self.target_normalizations:
                features = self.teacher_features(pixel_values, teacher)
                for (name, layer), moment in moments.items():
                    if name == teacher:
                        moment.update(features[int(layer)])
        for (teacher, layer), moment in moments.items():
            if reduce_sum is not None:
                moment.reduce(reduce_sum)
            self.target_normalizations[teacher][layer].fit(moment)
        return images

    def student_features(self, pixel_values: torch.Tensor, student: str | None = None) -> BlockOutputs:
        """A student's block outputs up to its deepest distilled block (the later ones are frozen, unread)."""
        name = student or self._only("student", self.students)
        last = max(max(pair.student_layers) for pair in self.pairs if pair.student == name)
        return self._student_views[name].block_outputs(pixel_values, last_block=last)

    def _freeze_unreached_student_parameters(self, name: str, plans: dict) -> list[str]:
        """Freezes the parameters of student `name` outside the autograd graph of its distilled
        blocks' outputs, traced on one blank image (the graph does not depend on the pixel values) in
        eval mode (no random draws, no running statistics updated); returns their names."""
        student, view = self.students[name], self._student_views[name]
        layers = sorted({layer for (student_name, _), (_, student_layers) in plans.items() if student_name == name for layer in student_layers})
        parameters = dict(student.named_parameters())
        trainable = {key: parameter for key, parameter in parameters.items() if parameter.requires_grad}
        blank = next(iter(parameters.values())).new_zeros(1, view.num_channels, self.image_size, self.image_size)
        training = student.training
        student.eval()
        try:
            with torch.enable_grad():
                features = view.block_outputs(blank, last_block=layers[-1])
                traced = sum(features[layer].sum() for layer in layers)
                gradients = torch.autograd.grad(traced, list(trainable.values()), allow_unused=True)
        finally:
            student.train(training)
        unreached = [key for key, gradient in zip(trainable, gradients) if gradient is None]
        for key in unreached:
            parameters[key].requires_grad_(False)
        return unreached

    def student_parameters(self, name: str) -> list[nn.Parameter]:
        """Everything trained for student `name`: the student, its heads, its adapters on every teacher."""
        adapters = [
            parameter
            for teacher in self.teachers.values()
            for key, parameter in teacher.named_parameters()
            if parameter.requires_grad and key.endswith(f".{self.adapter_name(name)}")
        ]
        own = [parameter for parameter in [*self.students[name].parameters(), *self.methods[name].parameters()] if parameter.requires_grad]
        return own + adapters

    def cast_teacher(self, dtype: torch.dtype) -> None:
        """Store the frozen teachers' weights in `dtype` (e.g. bfloat16 when training under bf16 autocast).

        A frozen teacher needs no float32 master weights, and autocast re-casts float32 weights that do
        not require grad on every step; cast once, the matmuls see the same bf16 weights. Trainable
        parameters (the SiNGER adapters) keep their dtype.
        """
        for parameter in self.teachers.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)

    def compile_blocks(self, **compile_kwargs) -> None:
        """Regional compilation: `torch.compile` each teacher and student block in place.

        The repeated block is compiled once and reused, while the loss code, the PEFT wrappers and
        the block loop stay eager; compiling the whole model would break its graph at each of them.
        """
        for view in [*self._teacher_views.values(), *self._student_views.values()]:
            for block in view.blocks:
                block.compile(**compile_kwargs)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        channels = next(iter(self._student_views.values())).num_channels
        expected = (channels, self.image_size, self.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected B×{expected[0]}×{expected[1]}×{expected[2]} images, got {shape}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values: expected normalised float images, got {pixel_values.dtype} (see data.PixelNormalizer)")


@dataclass
class DistillationGroupConfig:
    """Every student's config and every teacher's settings, as logging integrations record a model's config."""

    students: dict[str, DistillationModelConfig]
    teachers: dict[str, TeacherSettings]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


@functools.cache
def _takes_views(method: type[DistillationMethod]) -> bool:
    """Whether `method.losses` takes `views`: one written without it trains, its features unrecorded."""
    return "views" in inspect.signature(method.losses).parameters


def _is_frozen_teacher_weight(key: str, prefix: str) -> bool:
    return key.startswith(prefix + "teachers.") and "singer_" not in key


def _drop_frozen_teacher_weights(module, state_dict, prefix, local_metadata) -> None:
    for key in [key for key in state_dict if _is_frozen_teacher_weight(key, prefix)]:
        del state_dict[key]


def _take_frozen_teacher_weights(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """A saved state has no teacher weights: load the live teachers' own in their place."""
    for name, teacher in module.teachers.items():
        for key, value in teacher.state_dict(prefix=f"{prefix}teachers.{name}.", keep_vars=True).items():
            if _is_frozen_teacher_weight(key, prefix):
                state_dict.setdefault(key, value)


def _named(models, kind: str) -> dict[str, nn.Module]:
    """`{DEFAULT_NAME: model}` for one model, else the mapping, its names checked."""
    if isinstance(models, nn.Module):
        return {DEFAULT_NAME: models}
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"{kind}: give a model, or a mapping of names to models, got {type(models).__name__}")
    for name in models:
        if not isinstance(name, str) or not name or any(character in name for character in "./ "):
            raise ValueError(f"{kind}: {name!r} is not a usable name (non-empty, without '.', '/' or spaces)")
    return dict(models)


def _per_student(config, students: dict) -> dict[str, DistillationModelConfig]:
    if config is None or isinstance(config, DistillationModelConfig):
        return {name: config or DistillationModelConfig() for name in students}
    configs = dict(config)
    if set(configs) != set(students):
        raise ValueError(f"config: give one config per student; students {sorted(students)}, configs {sorted(configs)}")
    return {name: configs[name] for name in students}


def _argument(kind: str, name: str, models: dict) -> str:
    """How errors name a model: "teacher", or "teacher dinov3" when there are several."""
    return kind if len(models) == 1 else f"{kind} {name}"


def _with_adapter(teacher: nn.Module, name: str, config: SingerConfig) -> nn.Module:
    """`teacher` carrying adapter `name` made from `config` (a teacher passed in with it keeps its own)."""
    if not isinstance(teacher, peft.PeftModel):
        return peft.get_peft_model(teacher, config, adapter_name=name)
    if name in teacher.peft_config:
        _check_adapters_match(teacher, name, config)
    else:
        teacher.add_adapter(name, config)
    return teacher


def _check_adapters_match(teacher: peft.PeftModel, name: str, wanted: SingerConfig) -> None:
    """A teacher passed in with its adapters must carry the ones this configuration would create."""
    adapter = teacher.peft_config.get(name)
    if not isinstance(adapter, SingerConfig):
        found = f"a {adapter.peft_type} adapter" if adapter is not None else f"no adapter (it has {sorted(teacher.peft_config)})"
        raise ValueError(f"teacher: its adapter {name!r} is {found}, not SiNGER; pass the plain teacher instead")
    if adapter.layers != wanted.layers:
        raise ValueError(f"teacher_layers: {wanted.layers} differ from the teacher's SiNGER adapters on {adapter.layers}")
    if adapter.rank != wanted.rank:
        raise ValueError(f"rank: {wanted.rank} differs from the teacher's SiNGER adapters of rank {adapter.rank}")


def _check_not_meta(model: nn.Module, argument: str) -> None:
    """Weights on the meta device (a model built under `torch.device("meta")` or `init_empty_weights`)
    cannot be distilled from; say so before PEFT fails copying them."""
    if any(parameter.is_meta for parameter in model.parameters()):
        raise ValueError(
            f"{argument}: its weights are on the meta device (built without weights); load it with from_pretrained "
            "or materialise it (model.to_empty(device=...) and load a state dict) first"
        )


def _check_compatible(teacher: ResolvedViT, student: ResolvedViT, teacher_image_size: int | None = None) -> None:
    """The images come at the student's size, the teacher reads them at its own (default: the same);
    patch grids may differ (`alignment.TokenAlignment`)."""
    student.check_image_size(student.image_size, "student")
    teacher.check_image_size(teacher_image_size or student.image_size, "teacher")
    if student.input_normalization is not None:
        raise ValueError(
            f"student: {student.model_type} models normalise their pixels inside their forward and can only be teachers; "
            "use a ViT, DeiT, DINOv2/v3, CLIP, SigLIP or AIMv2 student"
        )
    if teacher.num_channels != student.num_channels:
        raise ValueError(f"student: {student.num_channels} input channels, the teacher has {teacher.num_channels}")
