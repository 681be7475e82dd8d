"""Student tokens matched with the teacher's for the feature-distillation losses.

Two models need not have the same tokens: their prefix tokens differ (DeiT's distillation token,
registers, C-RADIO's several summary tokens, SigLIP's none), and so do their patch grids (a /14
teacher and a /16 student at 224 px: 16×16 and 14×14 patches). KD compares the CLS (summary) tokens
both models have, in order, and the patch tokens on the teacher's grid.

The student's side is resampled, onto the teacher's grid. SiNGER's refined teacher feature F̂ is the
KD target and also what its outlier and information-preservation losses read, on the teacher's own
grid; the KD gradient reaches the adapter through F̂. Resampling the teacher would blur that target
(an artifact token's norm spread over its neighbours) and average the adapter's gradient across
neighbouring tokens; resampling the student keeps the target exactly the tokens those losses see.
The student's patch map is resampled bilinearly (antialiased when it shrinks) before the projector,
which is per-token linear, so the two commute and the cheaper width is interpolated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .architectures import ResolvedViT


@dataclass(frozen=True)
class TokenAlignment:
    """How a student's block outputs line up with a teacher's, for images of one size."""

    student_prefix: int
    teacher_prefix: int
    class_tokens: int
    """CLS (summary) tokens compared: the first ones of each model, as many as both have."""
    student_grid: tuple[int, int]
    teacher_grid: tuple[int, int]
    all_tokens: bool
    """Same prefix tokens and grid: every token is compared with its counterpart (registers with registers)."""

    @classmethod
    def between(cls, student: ResolvedViT, teacher: ResolvedViT, image_size: int, teacher_image_size: int | None = None) -> TokenAlignment:
        """`teacher_image_size`: the size the teacher reads the same images at (`TeacherSettings.image_size`), default `image_size`."""
        student_grid = (image_size // student.patch_size,) * 2
        teacher_grid = ((teacher_image_size or image_size) // teacher.patch_size,) * 2
        same_prefix = (student.num_prefix_tokens, student.num_class_tokens) == (teacher.num_prefix_tokens, teacher.num_class_tokens)
        return cls(
            student_prefix=student.num_prefix_tokens,
            teacher_prefix=teacher.num_prefix_tokens,
            class_tokens=min(student.num_class_tokens, teacher.num_class_tokens),
            student_grid=student_grid,
            teacher_grid=teacher_grid,
            all_tokens=same_prefix and student_grid == teacher_grid,
        )

    @property
    def compared_prefix_tokens(self) -> int:
        """Prefix tokens ahead of the patch tokens in the sequences `__call__` returns."""
        return self.teacher_prefix if self.all_tokens else self.class_tokens

    def __call__(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student tokens, teacher tokens) to compare, from B×N×D block outputs of each model."""
        if self.all_tokens:
            return student_feature, teacher_feature
        classes = self.class_tokens
        student_patches = self.to_teacher_grid(student_feature[:, self.student_prefix :])
        student = torch.cat([student_feature[:, :classes], student_patches], dim=1)
        teacher = torch.cat([teacher_feature[:, :classes], teacher_feature[:, self.teacher_prefix :]], dim=1)
        return student, teacher

    def to_teacher_grid(self, student_patches: torch.Tensor) -> torch.Tensor:
        """B×P×D student patch tokens (raster order) resampled onto the teacher's patch grid."""
        if self.student_grid == self.teacher_grid:
            return student_patches
        batch, _, width = student_patches.shape
        grid = student_patches.transpose(1, 2).reshape(batch, width, *self.student_grid)
        shrinking = self.teacher_grid[0] < self.student_grid[0]
        resampled = F.interpolate(grid, size=self.teacher_grid, mode="bilinear", align_corners=False, antialias=shrinking)
        return resampled.flatten(2).transpose(1, 2)
