"""Configuration of the SiNGER nullspace adapter (a PEFT method)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

INIT_METHODS = ("nullspace", "random")


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
            τ, absolute threshold on the singular values of M = (W_fc2 W_fc1)ᵀ: directions with σ < τ
            form the nullspace candidates. Missing rows are filled with seeded random unit vectors.
        init (`str`):
            "nullspace" (the method) or "random" (the paper's ablation: r random unit-norm rows).
        seed (`int`):
            Seed of the random rows (padding rows of a short nullspace, or the "random" init); block l
            uses seed + l, so initialisation is reproducible.
        target_modules (`Optional[Union[list[str], str]]`):
            Filled in from `layers` and the teacher's architecture table entry; leave as None.
    """

    layers: list[int] = field(default_factory=list, metadata={"help": "Distilled teacher blocks, ascending."})
    rank: int = field(default=64, metadata={"help": "Rank r of each adapter."})
    null_threshold: float = field(default=0.05, metadata={"help": "Singular-value threshold τ of the nullspace."})
    init: Literal["nullspace", "random"] = field(default="nullspace", metadata={"help": "'nullspace' or 'random'."})
    seed: int = field(default=0, metadata={"help": "Seed of the random rows; block l uses seed + l."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Regex of the adapted blocks; derived from `layers`, leave None."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SINGER
        layers = [int(layer) for layer in self.layers]
        if not layers:
            raise ValueError("layers: give at least one distilled teacher block index, e.g. [17, 23]")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers: duplicate teacher layers in {layers}; each block can be distilled once")
        if min(layers) < 0:
            raise ValueError(f"layers: block indices must be >= 0, got {layers}")
        self.layers = sorted(layers)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: must be an integer >= 1, got {self.rank!r}")
        if self.null_threshold < 0:
            raise ValueError(f"null_threshold: must be >= 0, got {self.null_threshold}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init: must be one of {INIT_METHODS}, got {self.init!r}")
