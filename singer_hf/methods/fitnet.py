"""FitNet: the student mimics the teacher's raw features (the paper's main baseline)."""

from __future__ import annotations

from .base import DistillationMethod, register_method


@register_method
class FitNet(DistillationMethod):
    """λ · Σ_l MSE(P_l(F_S^j), F_T^l) on the raw teacher features, high-norm artifacts included."""

    name = "fitnet"
    label = "FitNet"
    summary = (
        "FitNet (the paper's baseline): the student mimics the teacher's raw features, high-norm artifact "
        "tokens included, through a linear projector and a mean-squared error."
    )
    heads_description = "the linear projectors (student width → teacher width), one per block pair."
    loss_weights = {"kd": ("kd_weight", 10.0)}

    def __init__(self, config, teacher, student, teacher_layers, student_layers):
        super().__init__(config, teacher, student, teacher_layers, student_layers)
        self.projectors = self.make_projectors(len(teacher_layers))

    @staticmethod
    def default_layers(depth: int) -> list[int]:
        return sorted({max(int(fraction * depth + 0.5) - 1, 0) for fraction in (0.5, 0.75, 1.0)})  # ViT-L: [11, 17, 23]

    def losses(self, teacher_features, student_features, views=None):
        kd = 0
        for projector, t, s in zip(self.projectors, self.teacher_layers, self.student_layers):
            if views is not None:
                views.add("teacher", t, teacher_features[t], self._teacher.num_prefix_tokens)
            kd = kd + self.kd(projector, student_features[s], self.target(t, teacher_features[t]), views, t)
        return {"kd": kd}
