"""SiNGER: distil the teacher's features after refining them with nullspace-initialised adapters."""

from __future__ import annotations

import torch
from torch import nn

from ..losses import feature_mse, gram_loss, outlier_loss
from ..tuner import SingerConfig, check_basis_blocks
from .base import DistillationMethod, MethodFields, register_method


@register_method
class Singer(DistillationMethod):
    """KD to the refined features F̂^l (normalised where the teacher's targets are, `target`), outlier
    suppression on their norms, information preservation (both on F̂^l as it is).

    The teacher's adapters (`SingerLayer`, one per distilled block) are a PEFT adapter on the frozen
    teacher, injected by `DistillationModel` from `adapter_config`; this method trains them through
    its losses. Information preservation for an intermediate layer l compares block l+1 run on F̂^l
    with F^{l+1}, which the teacher forward already computed; for the final layer it compares the
    cosine Gram matrix of F̂^final with that of the last refined intermediate feature (with one
    distilled layer: that layer's unrefined feature). See docs/method.md.
    """

    name = "singer"
    label = "SiNGER"
    summary = (
        "SiNGER (Singular Nullspace-Guided Energy Reallocation) refines the teacher's features before "
        "distilling them: a low-rank adapter on each distilled teacher block adds a perturbation that "
        "lowers the norm of high-norm artifact tokens while lying near the nullspace of the next block, "
        "so the information the teacher carries forward is preserved. The student mimics the refined "
        "features through a linear projector."
    )
    heads_description = "the linear projectors (student width → teacher width), one per block pair."
    loss_weights = {"kd": ("kd_weight", 1.0), "outlier": ("outlier_weight", 0.01), "info": ("info_weight", 1.0)}
    term_labels = {"kd": "KD", "info": "information"}

    def __init__(self, config: MethodFields, teacher, student, teacher_layers, student_layers):
        super().__init__(config, teacher, student, teacher_layers, student_layers)
        self.projectors = self.make_projectors(len(teacher_layers))
        self._adapters: dict[int, nn.Module] = {}  # the teacher's modules: kept out of this module's parameters
        self._adapter_name = None

    @staticmethod
    def default_layers(depth: int) -> list[int]:
        return sorted({max(int(0.75 * depth + 0.5) - 1, 0), depth - 1})  # ViT-L: [17, 23]

    @classmethod
    def check_teacher(cls, teacher, teacher_layers) -> None:
        check_basis_blocks(teacher, teacher_layers)

    @classmethod
    def adapter_config(cls, config: MethodFields, teacher_layers: list[int]) -> SingerConfig:
        return SingerConfig(layers=list(teacher_layers), **config.adapter_values())

    @classmethod
    def settings(cls, config: MethodFields) -> list[tuple[str, str]]:
        return [
            ("Adapter rank", str(config.rank)),
            ("Nullspace threshold τ", f"{config.null_threshold:g}"),
            ("Adapter initialisation", f"{config.adapter_init} (seed {config.adapter_seed})"),
            ("Outlier quantile q", f"{config.outlier_quantile:g}"),
            *super().settings(config),
        ]

    def bind_adapters(self, adapters: dict[int, nn.Module], adapter_name: str) -> None:
        self._adapters, self._adapter_name = adapters, adapter_name

    def refine(self, layer: int, feature: torch.Tensor) -> torch.Tensor:
        return self._adapters[layer].refine(feature, adapter_names=[self._adapter_name])

    def losses(self, teacher_features, student_features, views=None) -> dict[str, torch.Tensor]:
        prefix = self._teacher.num_prefix_tokens
        kd, outlier, info = [], [], []
        reference = None  # the last refined intermediate feature: the final layer's Gram reference
        for index, (layer, student_layer) in enumerate(zip(self.teacher_layers, self.student_layers)):
            feature = teacher_features[layer]
            refined = self.refine(layer, feature)
            if views is not None:
                views.add("teacher", layer, feature, prefix)
                views.add("refined_teacher", layer, refined, prefix)
            kd.append(self.kd(self.projectors[index], student_features[student_layer], self.target(layer, refined), views, layer))
            outlier.append(outlier_loss(refined[:, prefix:], self.config.outlier_quantile))
            if layer == self.teacher_layers[-1]:
                reference = feature if reference is None else reference  # one distilled layer: its unrefined feature
                info.append(gram_loss(refined[:, prefix:], reference[:, prefix:]))
            else:
                # Block l+1 on F^l is F^{l+1}, already computed by the teacher forward.
                following = self._teacher.run_block(layer + 1, refined, teacher_features.block_kwargs)
                info.append(feature_mse(following, teacher_features[layer + 1]))
                reference = refined
        count = len(self.teacher_layers)
        return {"kd": sum(kd) / count, "outlier": sum(outlier) / count, "info": sum(info) / count}
