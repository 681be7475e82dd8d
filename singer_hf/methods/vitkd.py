"""ViTKD: mimic the teacher's shallow blocks, generate its deepest one from masked student tokens."""

from __future__ import annotations

import torch
from torch import nn

from ..losses import feature_mse
from .base import DistillationMethod, register_method


@register_method
class ViTKD(DistillationMethod):
    """Shallow layers: MSE after a linear projector. Deepest layer: student patch tokens are masked at
    random (`mask_ratio`) with a learned mask token, a generator (3×3 conv, ReLU, 3×3 conv on the patch
    grid) reconstructs the teacher's patch tokens, MSE on the masked positions. Unlike the official
    code, the generator and the mask token are trained.

    The masks come from the method's own random generator (seeded when the method is built, saved
    with its state), so a ViTKD student draws the same masks alone and beside other students, and a
    resumed run draws the masks the uninterrupted one would have."""

    name = "vitkd"
    label = "ViTKD"
    summary = (
        "ViTKD (a baseline in the paper): the student mimics the teacher's shallow blocks through linear "
        "projectors, and a generator reconstructs the teacher's last block from randomly masked student "
        "tokens."
    )
    heads_description = "the mimic projectors, the generation projector, the generator and the mask token."
    loss_weights = {"mimic": ("kd_weight", 1.0), "generation": ("generation_weight", 1.0)}
    final_role, other_role = "generated", "mimicked"

    def __init__(self, config, teacher, student, teacher_layers, student_layers):
        super().__init__(config, teacher, student, teacher_layers, student_layers)
        width = teacher.width
        self.projectors = self.make_projectors(len(teacher_layers) - 1)
        self.generation_projector = nn.Linear(student.width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.generator = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
        self.mask_generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))

    @staticmethod
    def default_layers(depth: int) -> list[int]:
        return sorted({0, min(1, depth - 1), depth - 1})

    @classmethod
    def settings(cls, config):
        return [("Mask ratio", f"{config.mask_ratio:g}"), *super().settings(config)]

    def get_extra_state(self) -> torch.Tensor:
        return self.mask_generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.mask_generator.set_state(state.cpu())

    def draw_mask(self, batch: int, count: int, device: torch.device) -> torch.Tensor:
        """B×P booleans, True for the student patch tokens to mask."""
        return (torch.rand(batch, count, generator=self.mask_generator) < self.config.mask_ratio).to(device)

    def losses(self, teacher_features, student_features, views=None):
        """`views`: the generated layer's student view is the generator's output (patch tokens only)."""
        pairs = list(zip(self.teacher_layers, self.student_layers))
        if views is not None:
            for layer in self.teacher_layers:
                views.add("teacher", layer, teacher_features[layer], self._teacher.num_prefix_tokens)
        mimic = sum(self.kd(projector, student_features[s], self.target(t, teacher_features[t]), views, t) for projector, (t, s) in zip(self.projectors, pairs))
        teacher_layer, student_layer = pairs[-1]
        student_patches = student_features[student_layer][:, self._student.num_prefix_tokens :]
        patches = self.generation_projector(self.alignment.to_teacher_grid(student_patches))  # on the teacher's grid
        batch, count, width = patches.shape
        masked = self.draw_mask(batch, count, patches.device)
        patches = torch.where(masked.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        generated = self.generator(patches.transpose(1, 2).reshape(batch, width, *self.alignment.teacher_grid)).flatten(2).transpose(1, 2)
        target = self.target(teacher_layer, teacher_features[teacher_layer])[:, self._teacher.num_prefix_tokens :]
        generation = feature_mse(generated, target, token_mask=masked)
        if views is not None:
            views.add("student", teacher_layer, generated, 0)
        return {"mimic": mimic if pairs[:-1] else generation.new_zeros(()), "generation": generation}
