"""`DistillationModel`: a frozen ViT teacher, an HF student, projectors and the distillation losses."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import peft
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from transformers.utils import ModelOutput

from .alignment import TokenAlignment
from .architectures import BlockOutputs, ResolvedViT, backbone_of, resolve_vit
from .losses import feature_mse, gram_loss, outlier_loss
from .tuner import SingerConfig, check_basis_blocks
from .validation import DistillationFields

# Loss weights each method uses when the config leaves them as None (SPEC §6, §8).
DEFAULT_WEIGHTS = {
    "singer": {"kd": 1.0, "outlier": 0.01, "info": 1.0},
    "fitnet": {"kd": 10.0},
    "vitkd": {"mimic": 1.0, "generation": 1.0},
}


@dataclass
class DistillationConfig(DistillationFields):
    """What to distil and how; the fields, their defaults and checks are in `validation.DISTILLATION_FIELDS`.

    `None` fields take the method's defaults, scaled to the teacher's depth: `teacher_layers` singer
    [¾L−1, L−1] (ViT-L: [17, 23]), fitnet [½L−1, ¾L−1, L−1], vitkd [0, 1, L−1]; loss weights as in
    `DEFAULT_WEIGHTS`. Students get one block per teacher block by Hungarian assignment.
    """

    def __post_init__(self):
        self.check_distillation_fields()

    def weights(self) -> dict[str, float]:
        """The loss weights of this config's method, defaults filled in."""
        given = {
            "kd": self.kd_weight,
            "mimic": self.kd_weight,
            "outlier": self.outlier_weight,
            "info": self.info_weight,
            "generation": self.generation_weight,
        }
        return {name: default if given[name] is None else given[name] for name, default in DEFAULT_WEIGHTS[self.method].items()}

    def layers_for(self, teacher_depth: int) -> list[int]:
        """`teacher_layers`, or the method's default for a teacher of this depth."""
        if self.teacher_layers is not None:
            return list(self.teacher_layers)
        last = teacher_depth - 1
        three_quarters = int(0.75 * teacher_depth + 0.5) - 1
        defaults = {
            "singer": [three_quarters, last],
            "fitnet": [int(0.5 * teacher_depth + 0.5) - 1, three_quarters, last],
            "vitkd": [0, 1, last],
        }[self.method]
        return sorted({max(layer, 0) for layer in defaults})

    def singer_config(self, teacher_depth: int) -> SingerConfig:
        return SingerConfig(
            layers=self.layers_for(teacher_depth),
            rank=self.rank,
            null_threshold=self.null_threshold,
            init=self.adapter_init,
            seed=self.adapter_seed,
        )

    # The parts of `PretrainedConfig` that the Trainer and its logging callbacks (tensorboard, wandb,
    # mlflow, ...) read from `model.config`.
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def map_layers(teacher_layers: list[int], teacher_depth: int, student_depth: int) -> list[int]:
    """Student block for each teacher block: Hungarian assignment on |l/L_T − j/(L_S−1)| (SPEC §3).

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


def plan_layers(teacher: ResolvedViT, student: ResolvedViT, config: DistillationConfig) -> tuple[list[int], list[int]]:
    """(teacher blocks, student blocks) to distil, after checking that the two models fit together.

    Needs only the models' structure, not their weights: scripts run it on models built on the meta
    device to fail before anything is downloaded or loaded.
    """
    _check_compatible(teacher, student)
    teacher_layers = config.layers_for(teacher.depth)
    if teacher_layers[-1] >= teacher.depth:
        raise ValueError(
            f"teacher_layers: block {teacher_layers[-1]} is out of range for a {teacher.depth}-block "
            f"teacher (valid: 0..{teacher.depth - 1})"
        )
    if config.method == "singer":
        check_basis_blocks(teacher, teacher_layers)
    return teacher_layers, map_layers(teacher_layers, teacher.depth, student.depth)


@dataclass
class DistillationOutput(ModelOutput):
    """`loss`: the weighted total to minimise; `losses`: each term, unweighted, as the method sums it."""

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None


class DistillationModel(nn.Module):
    """Teacher (frozen, eval mode), student, projectors, and for SiNGER the teacher's adapters.

    `forward(pixel_values)` runs the teacher once without gradients, the student with them, and
    returns the method's losses. Gradients reach the adapters through the frozen teacher block l+1
    of the information-preservation loss; the teacher's own weights never get any.

    Student parameters that no loss reaches (its final norm and pooler, blocks after the deepest
    distilled one, DINOv2's mask token) are frozen (`frozen_student_parameters`): every trainable
    parameter then gets a gradient at every step, so DDP runs without `find_unused_parameters`.
    They keep their values and are saved with the student; a student loaded from the saved folder
    has them trainable again.
    """

    # Each loss is a per-batch mean; the Trainer must divide it by the accumulation steps itself
    # (transformers 5 would otherwise assume `**kwargs` means "normalised by num_items_in_batch").
    accepts_loss_kwargs = False

    def __init__(self, teacher: nn.Module, student: nn.Module, config: DistillationConfig | None = None):
        super().__init__()
        self.config = config = config or DistillationConfig()
        if not isinstance(teacher, peft.PeftModel):
            teacher = backbone_of(teacher)  # no task head, no text tower: only what distillation reads
        teacher_vit = resolve_vit(teacher, "teacher")
        student_vit = resolve_vit(student, "student")
        self.teacher_layers, self.student_layers = plan_layers(teacher_vit, student_vit, config)
        # Images come at the student's size (the saved student and its processor must agree); the
        # teacher reads them at that size too, interpolating its position embeddings if built for another.
        self.image_size = student_vit.image_size
        teacher_vit.run_at(self.image_size, "teacher")
        self._alignment = TokenAlignment.between(student_vit, teacher_vit, self.image_size)
        self.weights = config.weights()

        if config.method == "singer":
            if not isinstance(teacher, peft.PeftModel):
                teacher = peft.get_peft_model(teacher, config.singer_config(teacher_vit.depth))
            else:
                _check_adapters_match(teacher, self.teacher_layers, config.rank)
            teacher_vit = resolve_vit(teacher, "teacher")
        # Only the active SiNGER adapters train; a PeftModel loaded for inference has them frozen.
        teacher.requires_grad_(False)
        if config.method == "singer":
            teacher.base_model.set_requires_grad(teacher.active_adapter, True)
        self.teacher = teacher
        # Resolved once: looking them up walks the teacher's blocks, which a training step need not repeat.
        self._adapters = teacher.base_model.singer_layers if config.method == "singer" else {}
        self.student = student
        self._teacher_vit, self._student_vit = teacher_vit, student_vit
        self.frozen_student_parameters = self._freeze_unreached_student_parameters()

        distilled = self.teacher_layers if config.method != "vitkd" else self.teacher_layers[:-1]
        self.projectors = nn.ModuleList(nn.Linear(student_vit.width, teacher_vit.width) for _ in distilled)
        if config.method == "vitkd":
            width, side = teacher_vit.width, self.image_size // teacher_vit.patch_size
            self.generation_projector = nn.Linear(student_vit.width, width)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
            self.generator = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)
            )
            self._patch_grid = side
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
        """SiNGER adapter layers by teacher block (empty for the baselines)."""
        return self._adapters

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, **unused) -> DistillationOutput:
        self._check_pixel_values(pixel_values)
        teacher_features = self.teacher_features(pixel_values)
        student_features = self.student_features(pixel_values)
        losses = getattr(self, f"_{self.config.method}_losses")(teacher_features, student_features)
        loss = sum(self.weights[name] * value for name, value in losses.items())
        return DistillationOutput(loss=loss, losses=losses)

    def teacher_features(self, pixel_values: torch.Tensor) -> BlockOutputs:
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

    def _singer_losses(self, teacher_features, student_features) -> dict[str, torch.Tensor]:
        prefix = self._teacher_vit.num_prefix_tokens
        adapters = self.adapters
        kd, outlier, info = [], [], []
        reference = None  # the last refined intermediate feature: the final layer's Gram reference
        for index, (layer, student_layer) in enumerate(zip(self.teacher_layers, self.student_layers)):
            feature = teacher_features[layer]
            refined = adapters[layer].refine(feature)
            kd.append(self._kd(index, student_features[student_layer], refined))
            outlier.append(outlier_loss(refined[:, prefix:], self.config.outlier_quantile))
            if layer == self.teacher_layers[-1]:
                # One distilled layer: the Gram reference is that layer's unrefined feature (SPEC §7).
                reference = feature if reference is None else reference
                info.append(gram_loss(refined[:, prefix:], reference[:, prefix:]))
            else:
                # Block l+1 on F^l is F^{l+1}, already computed by the teacher forward.
                following = self._teacher_vit.run_block(layer + 1, refined, teacher_features.block_kwargs)
                info.append(feature_mse(following, teacher_features[layer + 1]))
                reference = refined
        count = len(self.teacher_layers)
        return {"kd": sum(kd) / count, "outlier": sum(outlier) / count, "info": sum(info) / count}

    def _fitnet_losses(self, teacher_features, student_features) -> dict[str, torch.Tensor]:
        pairs = zip(self.teacher_layers, self.student_layers)
        return {"kd": sum(self._kd(i, student_features[s], teacher_features[t]) for i, (t, s) in enumerate(pairs))}

    def _vitkd_losses(self, teacher_features, student_features) -> dict[str, torch.Tensor]:
        pairs = list(zip(self.teacher_layers, self.student_layers))
        mimic = sum(self._kd(i, student_features[s], teacher_features[t]) for i, (t, s) in enumerate(pairs[:-1]))
        teacher_layer, student_layer = pairs[-1]
        student_patches = student_features[student_layer][:, self._student_vit.num_prefix_tokens :]
        patches = self.generation_projector(self._alignment.to_teacher_grid(student_patches))
        batch, count, width = patches.shape
        masked = torch.rand(batch, count, device=patches.device) < self.config.mask_ratio
        patches = torch.where(masked.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        grid = patches.transpose(1, 2).reshape(batch, width, self._patch_grid, self._patch_grid)
        generated = self.generator(grid).flatten(2).transpose(1, 2)
        target = teacher_features[teacher_layer][:, self._teacher_vit.num_prefix_tokens :]
        generation = feature_mse(generated, target, token_mask=masked)
        return {"mimic": mimic if pairs[:-1] else generation.new_zeros(()), "generation": generation}

    def _kd(self, index: int, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        """MSE of the projected student tokens against the teacher's, matched by `alignment.TokenAlignment`."""
        student_tokens, teacher_tokens = self._alignment(student_feature, teacher_feature)
        return feature_mse(self.projectors[index](student_tokens), teacher_tokens)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vit = self._teacher_vit
        expected = (vit.num_channels, self.image_size, self.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected B×{expected[0]}×{expected[1]}×{expected[2]} images, got {shape}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values: expected normalised float images, got {pixel_values.dtype} (see data.PixelNormalizer)")


def _check_adapters_match(teacher: peft.PeftModel, layers: list[int], rank: int) -> None:
    adapter = teacher.peft_config[teacher.active_adapter]
    if not isinstance(adapter, SingerConfig):
        raise ValueError(f"teacher: its active adapter is {adapter.peft_type}, not SiNGER; pass the plain teacher instead")
    if adapter.layers != layers:
        raise ValueError(f"teacher_layers: {layers} differ from the teacher's SiNGER adapters on {adapter.layers}")
    if adapter.rank != rank:
        raise ValueError(f"rank: {rank} differs from the teacher's SiNGER adapters of rank {adapter.rank}")


def _check_compatible(teacher: ResolvedViT, student: ResolvedViT) -> None:
    """The images come at the student's size; patch grids may differ (`alignment.TokenAlignment`)."""
    student.check_image_size(student.image_size, "student")
    teacher.check_image_size(student.image_size, "teacher")
    if student.input_normalization is not None:
        raise ValueError(
            f"student: {student.model_type} models normalise their pixels inside their forward and can only be teachers; "
            "use a ViT, DeiT, DINOv2/v3, CLIP, SigLIP or AIMv2 student"
        )
    if teacher.num_channels != student.num_channels:
        raise ValueError(f"student: {student.num_channels} input channels, the teacher has {teacher.num_channels}")
