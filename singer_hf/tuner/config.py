"""Configuration of the SiNGER nullspace adapter (a PEFT method)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..checks import block_indices, check_fields, checked_field
from ..fields import AdapterFields


@dataclass
class SingerConfig(PeftConfig, AdapterFields):
    """
    Configuration of a [`SingerModel`]: one low-rank adapter per distilled teacher block.

    The adapter is a side branch. The teacher's own forward pass is unchanged; the adapter refines the
    output F^l of block l into F̂^l = F^l + (F^l W_d) W_u on patch tokens (prefix tokens untouched),
    and the refined features are what SiNGER distils. W_d = Nᵀ and W_u = N start from a basis N of the
    approximate left-nullspace of the next block's MLP, so the refinement barely changes what that
    block computes. The basis has `rank` rows: nullspace directions first (σ < `null_threshold`),
    then seeded random unit rows if there are fewer; `adapter_init="random"` uses random rows only.

    Args:
        layers (`list[int]`):
            Distilled teacher blocks 𝓛, ascending (0-based). The last one is the "final" layer: its
            basis comes from its own block's MLP; every other layer l uses block l + 1's MLP. The
            paper's ViT-L run uses [17, 23].
        target_modules (`Optional[Union[list[str], str]]`):
            Filled in from `layers` and the teacher's architecture table entry; leave as None.
    """

    layers: list[int] = checked_field(
        default_factory=list, help="Distilled teacher blocks, ascending.", check=block_indices(optional=False)
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Regex of the adapted blocks; derived from `layers`, leave None."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SINGER
        check_fields(self)
        self.layers = sorted(self.layers)
