"""Per-architecture facts SiNGER needs, in one table.

A new ViT family is one entry in `ARCHITECTURES`: where its blocks live, how many prefix tokens
(CLS, distillation token, registers) precede the patch tokens, and how to read every block's output.
Everything else in the package goes through `resolve_vit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


def _hf_block_outputs(backbone: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # hidden_states[0] is the embedding output; hidden_states[l + 1] is block l before the final norm.
    return backbone(pixel_values=pixel_values, output_hidden_states=True).hidden_states[1:]


def _timm_block_outputs(backbone: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # TimmWrapperModel's hidden states are B×C×H×W maps without the CLS token, so run the timm
    # model's own stem and blocks to read token features with their prefix tokens.
    vit = backbone.timm_model
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixel_values))))
    outputs = []
    for block in vit.blocks:
        x = block(x)
        outputs.append(x)
    return tuple(outputs)


def _hf_geometry(backbone: nn.Module) -> tuple[int, int, int]:
    config = backbone.config
    return int(config.image_size), int(config.patch_size), int(config.num_channels)


def _timm_geometry(backbone: nn.Module) -> tuple[int, int, int]:
    embed = backbone.timm_model.patch_embed
    if embed.img_size[0] != embed.img_size[1] or embed.patch_size[0] != embed.patch_size[1]:
        raise ValueError(f"model: only square timm ViTs are supported, got img_size={embed.img_size}")
    return int(embed.img_size[0]), int(embed.patch_size[0]), int(embed.proj.in_channels)


@dataclass(frozen=True)
class Architecture:
    """Where one ViT family keeps what SiNGER reads."""

    blocks: str
    """Dotted path from the backbone to the `nn.ModuleList` of transformer blocks."""
    num_prefix_tokens: Callable[[nn.Module], int]
    """Tokens before the patch tokens (CLS, distillation token, registers); the adapter leaves them alone."""
    fc1: str = "mlp.fc1"
    """Path inside a block to the MLP's first linear layer (H×D weight)."""
    fc2: str = "mlp.fc2"
    """Path inside a block to the MLP's second linear layer (D×H weight)."""
    block_outputs: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]] = field(default=_hf_block_outputs)
    """Every block's output (B×N×D, before the final norm) for a batch of images."""
    geometry: Callable[[nn.Module], tuple[int, int, int]] = field(default=_hf_geometry)
    """(image size, patch size, input channels) the model was built for."""


ARCHITECTURES: dict[str, Architecture] = {
    "vit": Architecture(blocks="layers", num_prefix_tokens=lambda m: 1),
    "deit": Architecture(blocks="layers", num_prefix_tokens=lambda m: 2),  # CLS + distillation token
    "dinov2": Architecture(blocks="encoder.layer", num_prefix_tokens=lambda m: 1),
    "dinov2_with_registers": Architecture(
        blocks="encoder.layer", num_prefix_tokens=lambda m: 1 + m.config.num_register_tokens
    ),
    "clip_vision_model": Architecture(blocks="encoder.layers", num_prefix_tokens=lambda m: 1),
    "timm_wrapper": Architecture(
        blocks="timm_model.blocks",
        num_prefix_tokens=lambda m: int(m.timm_model.num_prefix_tokens),
        block_outputs=_timm_block_outputs,
        geometry=_timm_geometry,
    ),
}


@dataclass(frozen=True)
class ResolvedViT:
    """A model bound to its table entry: the backbone (no task head) and its facts."""

    backbone: nn.Module
    architecture: Architecture
    blocks: nn.ModuleList
    num_prefix_tokens: int
    image_size: int
    patch_size: int
    num_channels: int

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.mlp_weights(0)[0].shape[1]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def block_outputs(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.architecture.block_outputs(self.backbone, pixel_values)

    def run_block(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        # Passed positionally as None: CLIP's block requires an attention mask, the others default it.
        output = self.blocks[index](hidden_states, None)
        return output[0] if isinstance(output, tuple) else output

    def mlp_weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_fc1: H×D, W_fc2: D×H) of block `index`, unwrapping a PEFT layer around the block."""
        block = self.blocks[index]
        block = getattr(block, "base_layer", block)
        fc1 = block.get_submodule(self.architecture.fc1)
        fc2 = block.get_submodule(self.architecture.fc2)
        return fc1.weight, fc2.weight


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def backbone_of(model: nn.Module) -> nn.Module:
    """The model without its task head: `ViTForImageClassification` → its `ViTModel`."""
    model = getattr(model, "get_base_model", lambda: model)()  # a PeftModel → the wrapped model
    if model_type_of(model) == "timm_wrapper":
        return model  # the wrapper itself reads the timm model; its base_model is the raw timm module
    return getattr(model, "base_model", model)


def resolve_vit(model: nn.Module, argument: str = "model") -> ResolvedViT:
    """Bind an HF ViT to its table entry, or fail naming `argument` and the supported families."""
    backbone = backbone_of(model)
    model_type = model_type_of(backbone)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{argument}: unsupported model type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    architecture = ARCHITECTURES[model_type]
    image_size, patch_size, num_channels = architecture.geometry(backbone)
    return ResolvedViT(
        backbone=backbone,
        architecture=architecture,
        blocks=backbone.get_submodule(architecture.blocks),
        num_prefix_tokens=architecture.num_prefix_tokens(backbone),
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
    )
