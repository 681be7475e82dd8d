"""Configuration of the SiNGER nullspace adapter (a PEFT method)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..validation import DISTILLATION_FIELDS, check_value


@dataclass
class SingerConfig(PeftConfig):
    """
    Configuration of a [`SingerModel`]: one low-rank adapter per distilled teacher block.

    The adapter is a side branch. The teacher's own forward pass is unchanged; the adapter refines the
    output F^l of block l into F̂^l = F^l + (F^l W_d) W_u on patch tokens (prefix tokens untouched),
    and the refined features are what SiNGER distils. W_d = Nᵀ and W_u = N start from a basis N of the
    approximate left-nullspace of the next block's MLP, so the refinement barely changes what that
    block computes.

    Args:
        layers (`list[int]`):
            Distilled teacher blocks 𝓛, ascending (0-based). The last one is the "final" layer: its
            basis comes from its own block's MLP; every other layer l uses block l + 1's MLP. The
            paper's ViT-L run uses [17, 23].
        rank (`int`):
            r, the number of basis rows per adapter (W_d is D×r, W_u is r×D).
        null_threshold (`float`):
            τ, threshold on the singular values of M = (W_fc2 W_fc1)ᵀ: directions with σ < τ form the
            nullspace candidates. For a gated MLP, M is the value path (W_down W_up)ᵀ, whose scale is
            arbitrary, and the rule is relative: σ < τ·σ_max (docs/gated_mlp.md). Missing rows are
            filled with seeded random unit vectors.
        init (`str`):
            "nullspace" (the method) or "random" (the paper's ablation: r random unit-norm rows).
        seed (`int`):
            Seed of the random rows (padding rows of a short nullspace, or the "random" init); block l
            uses seed + l, so initialisation is reproducible.
        target_modules (`Optional[Union[list[str], str]]`):
            Filled in from `layers` and the teacher's architecture table entry; leave as None.
    """

    layers: list[int] = field(default_factory=list, metadata={"help": "Distilled teacher blocks, ascending."})
    rank: int = DISTILLATION_FIELDS["rank"].field()
    null_threshold: float = DISTILLATION_FIELDS["null_threshold"].field()
    init: Literal["nullspace", "random"] = DISTILLATION_FIELDS["adapter_init"].field()
    seed: int = DISTILLATION_FIELDS["adapter_seed"].field()
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Regex of the adapted blocks; derived from `layers`, leave None."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SINGER
        # The same checks as DistillationConfig's fields of the same meaning (validation.py).
        for name, spec_name in (("layers", "teacher_layers"), ("rank", None), ("null_threshold", None),
                                ("init", "adapter_init"), ("seed", "adapter_seed")):  # fmt: skip
            check_value(name, getattr(self, name), spec_name)
        if not self.layers:
            raise ValueError("layers: give at least one distilled teacher block index, e.g. [17, 23]")
        self.layers = sorted(self.layers)
