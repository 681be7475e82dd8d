"""`DistillationModel`: a frozen ViT teacher, an HF student, and the method that distils one into the other."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import peft
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from transformers.utils import ModelOutput

from .architectures import ResolvedViT, backbone_of, resolve_vit
from .checks import check_fields
from .methods import DistillationMethod, MethodFields, get_method
from .tuner import SingerConfig


@dataclass
class DistillationModelConfig(MethodFields):
    """What to distil and how (the fields are declared in `methods.MethodFields` and the adapter's
    `tuner.config.AdapterFields`). `None` fields take the method's defaults: its teacher layers scaled
    to the teacher's depth (SiNGER on ViT-L: [17, 23]) and its loss weights. Students get one block per
    teacher block by Hungarian assignment (`map_layers`)."""

    def __post_init__(self):
        check_fields(self)
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


def plan_layers(teacher: ResolvedViT, student: ResolvedViT, config: DistillationModelConfig) -> tuple[list[int], list[int]]:
    """(teacher blocks, student blocks) to distil, after checking that the two models fit together.

    Needs only the models' structure, not their weights: scripts run it on models built on the meta
    device to fail before anything is downloaded or loaded.
    """
    _check_compatible(teacher, student)
    teacher_layers = config.layers_for(teacher.depth)
    teacher.check_blocks(teacher_layers, "teacher_layers")
    config.method_class.check_teacher(teacher, teacher_layers)
    return teacher_layers, map_layers(teacher_layers, teacher.depth, student.depth)


@dataclass
class DistillationOutput(ModelOutput):
    """`loss`: the weighted total to minimise; `losses`: each term, unweighted, as the method sums it."""

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None


class DistillationModel(nn.Module):
    """Teacher (frozen, eval mode), student, and the method (its heads; for SiNGER the teacher's adapters).

    `forward(pixel_values)` runs the teacher once without gradients, the student with them, and
    returns the method's losses. Gradients reach SiNGER's adapters through the frozen teacher block
    l+1 of the information-preservation loss; the teacher's own weights never get any.

    Student parameters that no loss reaches (its final norm and pooler, blocks after the deepest
    distilled one, DINOv2's mask token) are frozen (`frozen_student_parameters`): every trainable
    parameter then gets a gradient at every step, so DDP runs without `find_unused_parameters`.
    They keep their values and are saved with the student; a student loaded from the saved folder
    has them trainable again.
    """

    # Each loss is a per-batch mean; the Trainer must divide it by the accumulation steps itself
    # (transformers 5 would otherwise assume `**kwargs` means "normalised by num_items_in_batch").
    accepts_loss_kwargs = False
    adapter_name = "default"
    """The name of this model's PEFT adapter on the teacher (methods that train one)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, config: DistillationModelConfig | None = None):
        super().__init__()
        self.config = config = config or DistillationModelConfig()
        method_class = config.method_class
        if not isinstance(teacher, peft.PeftModel):
            teacher = backbone_of(teacher)  # no task head, no text tower: only what distillation reads
        _check_not_meta(teacher, "teacher")
        teacher_vit = resolve_vit(teacher, "teacher")
        student_vit = resolve_vit(student, "student")
        self.teacher_layers, self.student_layers = plan_layers(teacher_vit, student_vit, config)
        # Images come at the student's size (the saved student and its processor must agree); the
        # teacher reads them at that size too, interpolating its position embeddings if built for another.
        self.image_size = student_vit.image_size
        teacher_vit.run_at(self.image_size)
        self.weights = config.weights()

        adapter_config = method_class.adapter_config(config, self.teacher_layers)
        if adapter_config is not None:
            if not isinstance(teacher, peft.PeftModel):
                teacher = peft.get_peft_model(teacher, adapter_config, adapter_name=self.adapter_name)
            else:
                _check_adapters_match(teacher, self.adapter_name, adapter_config)
            teacher_vit = resolve_vit(teacher, "teacher")
        # Only this model's adapters train; a PeftModel loaded for inference has them frozen.
        teacher.requires_grad_(False)
        if adapter_config is not None:
            teacher.base_model.set_requires_grad(self.adapter_name, True)
        self.teacher, self.student = teacher, student
        self._teacher_vit, self._student_vit = teacher_vit, student_vit
        self.frozen_student_parameters = self._freeze_unreached_student_parameters()
        self.method = method_class(config, teacher_vit, student_vit, self.teacher_layers, self.student_layers)
        if adapter_config is not None:
            self.method.bind_adapters(teacher.base_model.singer_layers, self.adapter_name)
        self.teacher.eval()

    # -- nn.Module and the Trainer's model protocol -----------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher is a fixed target: no dropout, no drop-path
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs) -> None:
        """Checkpoint the student's blocks (`--activation_checkpointing`); the teacher keeps no activations anyway."""
        if not getattr(self.student, "supports_gradient_checkpointing", False):
            raise ValueError(f"activation_checkpointing: {type(self.student).__name__} students do not support it")
        self.student.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.student.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return bool(getattr(self.student, "is_activation_checkpointing", False))

    @property
    def adapters(self) -> dict[int, nn.Module]:
        """The teacher's adapter layers by block, for methods that train adapters (else empty)."""
        return self.teacher.base_model.singer_layers if isinstance(self.teacher, peft.PeftModel) else {}

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, **unused) -> DistillationOutput:
        self._check_pixel_values(pixel_values)
        teacher_features = self.teacher_features(pixel_values)
        student_features = self.student_features(pixel_values)
        losses = self.method.losses(teacher_features, student_features)
        loss = sum(self.weights[name] * value for name, value in losses.items())
        return DistillationOutput(loss=loss, losses=losses)

    def teacher_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The teacher's block outputs up to the deepest distilled block (the losses read no later
        block: SiNGER's F^{l+1} targets are all at or before the final layer), without gradients."""
        teacher_dtype = self._teacher_vit.blocks[0].parameters().__next__().dtype
        with torch.no_grad():
            return self._teacher_vit.block_outputs(pixel_values.to(teacher_dtype), last_block=self.teacher_layers[-1])

    def student_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The student's block outputs up to its deepest distilled block (the later ones are frozen, unread)."""
        return self._student_vit.block_outputs(pixel_values, last_block=max(self.student_layers))

    def _freeze_unreached_student_parameters(self) -> list[str]:
        """Freezes the student parameters outside the autograd graph of its distilled blocks' outputs,
        traced on one blank image (the graph does not depend on the pixel values) in eval mode (no
        random draws, no running statistics updated); returns their names."""
        vit, parameters = self._student_vit, dict(self.student.named_parameters())
        trainable = {name: parameter for name, parameter in parameters.items() if parameter.requires_grad}
        reference = next(iter(parameters.values()))
        blank = reference.new_zeros(1, vit.num_channels, self.image_size, self.image_size)
        training = self.student.training
        self.student.eval()
        try:
            with torch.enable_grad():
                features = self.student_features(blank)
                traced = sum(features[layer].sum() for layer in self.student_layers)
                gradients = torch.autograd.grad(traced, list(trainable.values()), allow_unused=True)
        finally:
            self.student.train(training)
        unreached = [name for name, gradient in zip(trainable, gradients) if gradient is None]
        for name in unreached:
            parameters[name].requires_grad_(False)
        return unreached

    def cast_teacher(self, dtype: torch.dtype) -> None:
        """Store the frozen teacher's weights in `dtype` (e.g. bfloat16 when training under bf16 autocast).

        A frozen teacher needs no float32 master weights, and autocast re-casts float32 weights that do
        not require grad on every step; cast once, the matmuls see the same bf16 weights. Trainable
        parameters (the SiNGER adapters) keep their dtype.
        """
        for parameter in self.teacher.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)

    def compile_blocks(self, **compile_kwargs) -> None:
        """Regional compilation: `torch.compile` each teacher and student block in place.

        The repeated block is compiled once and reused, while the loss code, the PEFT wrappers and
        the block loop stay eager; compiling the whole model would break its graph at each of them.
        """
        for block in [*self._teacher_vit.blocks, *self._student_vit.blocks]:
            block.compile(**compile_kwargs)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vit = self._teacher_vit
        expected = (vit.num_channels, self.image_size, self.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected B×{expected[0]}×{expected[1]}×{expected[2]} images, got {shape}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values: expected normalised float images, got {pixel_values.dtype} (see data.PixelNormalizer)")


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


def _check_compatible(teacher: ResolvedViT, student: ResolvedViT) -> None:
    if teacher.patch_size != student.patch_size:
        raise ValueError(
            f"student: patch size {student.patch_size} differs from the teacher's {teacher.patch_size}; "
            "the patch grids must match"
        )
    if student.image_size % student.patch_size:
        raise ValueError(f"student: image size {student.image_size} is not a multiple of its patch size {student.patch_size}")
    if teacher.num_channels != student.num_channels:
        raise ValueError(f"student: {student.num_channels} input channels, the teacher has {teacher.num_channels}")
