"""What a distillation method is, the settings methods share, and the registry that names them.

A method distils one teacher into one student: it knows its default teacher layers and loss
weights, builds the heads it trains (projectors, generators, ...), computes its losses from the
teacher's and the student's block outputs, and describes itself for the model card. The
`DistillationModel` does everything else (resolving the models, planning the layers, freezing,
running the teacher once); it never asks which method it runs.

A new method is one file: a subclass of `DistillationMethod` decorated with `@register_method`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..alignment import TokenAlignment
from ..architectures import ResolvedViT
from ..artifacts import ArtifactViews
from ..fields import MethodFields
from ..losses import feature_mse
from ..tuner.config import SingerConfig

METHODS: dict[str, type[DistillationMethod]] = {}
"""Every registered method by name: the values `--method` accepts."""


def register_method(method: type[DistillationMethod]) -> type[DistillationMethod]:
    """Class decorator: makes `method` available by its `name` (model configs, `--method`, recipes)."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"method: a method named {method.name!r} is already registered ({METHODS[method.name].__name__})")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> type[DistillationMethod]:
    if name not in METHODS:
        raise ValueError(f"method: must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


def method_label(name: str) -> str:
    """The method's display name ("SiNGER"), or `name` itself for one that is not registered here."""
    return METHODS[name].label if name in METHODS else name


class DistillationMethod(nn.Module):
    """One method distilling one teacher into one student; owns the heads it trains.

    Subclasses set the class attributes and implement `losses`; `kd` is the feature-mimicking term
    most methods share (a linear projector per layer pair, MSE on the tokens both models have).
    """

    name: ClassVar[str]
    """Registry key: the `method` value."""
    label: ClassVar[str]
    """Display name, e.g. "SiNGER"."""
    summary: ClassVar[str]
    """What the method does, for the student's model card."""
    heads_description: ClassVar[str]
    """What the saved heads are, for the model card and `distillation/README.md`."""
    loss_weights: ClassVar[dict[str, tuple[str, float]]]
    """Loss term → (the `MethodFields` weight field that sets it, its default)."""
    term_labels: ClassVar[dict[str, str]] = {"kd": "KD"}
    """How the model card names a loss term, where not by its name."""
    final_role: ClassVar[str] = "final"
    other_role: ClassVar[str] = "intermediate"
    """How the model card names the last distilled layer pair and the others."""

    def __init__(self, config: MethodFields, teacher: ResolvedViT, student: ResolvedViT, teacher_layers: list[int], student_layers: list[int]):
        super().__init__()
        self.config = config
        self.teacher_layers, self.student_layers = list(teacher_layers), list(student_layers)
        self._teacher, self._student = teacher, student  # bound views of models the DistillationModel owns
        self.alignment = TokenAlignment.between(student, teacher, student.image_size)
        """Set again by `DistillationModel` when the teacher reads images of its own size."""
        self._target_normalization: dict[int, nn.Module] = {}  # the model's modules: kept out of this module's state

    @staticmethod
    def default_layers(depth: int) -> list[int]:
        """The distilled teacher blocks for a `depth`-block teacher when `teacher_layers` is None."""
        raise NotImplementedError

    @classmethod
    def weights(cls, config: MethodFields) -> dict[str, float]:
        """The weight of each loss term, defaults filled in."""
        return {term: default if getattr(config, field) is None else getattr(config, field) for term, (field, default) in cls.loss_weights.items()}

    @classmethod
    def check_teacher(cls, teacher: ResolvedViT, teacher_layers: list[int]) -> None:
        """Raises a one-line ValueError when this method cannot run on these teacher blocks (structure only, no weights)."""

    @classmethod
    def adapter_config(cls, config: MethodFields, teacher_layers: list[int]) -> SingerConfig | None:
        """The PEFT adapter this method trains on the teacher, or None."""
        return None

    @classmethod
    def settings(cls, config: MethodFields) -> list[tuple[str, str]]:
        """(label, value) rows of the method's settings for the model card."""
        weights = ", ".join(f"{cls.term_labels.get(term, term)} {value:g}" for term, value in cls.weights(config).items())
        return [("Loss weights", weights)]

    def bind_adapters(self, adapters: dict[int, nn.Module], adapter_name: str) -> None:
        """The teacher's adapter layers this method trains (methods with an `adapter_config`)."""

    def bind_target_normalization(self, normalizations: dict[int, nn.Module]) -> None:
        """The teacher's target normalisation per teacher block (`TeacherSettings.normalization`),
        owned by the `DistillationModel` and shared by every student of that teacher."""
        self._target_normalization = dict(normalizations)

    def target(self, layer: int, teacher_feature: torch.Tensor) -> torch.Tensor:
        """The KD target of teacher block `layer`: `teacher_feature` (refined, for SiNGER) in the
        normalised space when the teacher's targets are normalised, else itself. Only KD targets go
        through it; losses on the teacher's own features (SiNGER's outlier and information terms)
        read them as they are."""
        normalization = self._target_normalization.get(layer)
        return teacher_feature if normalization is None else normalization(teacher_feature)

    def losses(
        self, teacher_features: tuple[torch.Tensor, ...], student_features: tuple[torch.Tensor, ...], views: ArtifactViews | None = None
    ) -> dict[str, torch.Tensor]:
        """Each loss term (unweighted) from the teacher's and the student's block outputs.

        `views`, when given, receives the features the losses compared, by distilled teacher block
        (`artifacts.VIEWS`: the teacher's, the refined teacher's for a method with adapters, the
        student's projected one), for the artifact statistics; a method that never gets one may
        leave the argument out."""
        raise NotImplementedError

    # -- shared by the feature-mimicking methods ------------------------------------------------
    def make_projectors(self, count: int) -> nn.ModuleList:
        return nn.ModuleList(nn.Linear(self._student.width, self._teacher.width) for _ in range(count))

    def kd(
        self,
        projector: nn.Module,
        student_feature: torch.Tensor,
        teacher_feature: torch.Tensor,
        views: ArtifactViews | None = None,
        layer: int | None = None,
    ) -> torch.Tensor:
        """MSE between the projected student tokens and the teacher's, matched by `alignment.TokenAlignment`;
        the projected student tokens go to `views` as teacher block `layer`'s student view."""
        student_tokens, teacher_tokens = self.alignment(student_feature, teacher_feature)
        projected = projector(student_tokens)
        if views is not None:
            views.add("student", layer, projected, self.alignment.compared_prefix_tokens)
        return feature_mse(projected, teacher_tokens)

