"""Per-architecture facts SiNGER needs, in one table.

A new ViT family is one entry in `ARCHITECTURES`: where its blocks live, which prefix tokens (CLS or
summary tokens, distillation token, registers) precede the patch tokens, how images become the
tokens entering block 0 together with whatever else the family hands every block (rotary position
embeddings, attention masks), how to run one block, and where each block's MLP keeps its weights.
Blocks are always run by calling the family's own block module, so what sits inside a block (layer
scale, the norms, rotary attention) stays the family's code. Everything else in the package goes
through `resolve_vit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel


@dataclass(frozen=True)
class Embedded:
    """What enters block 0 for one batch of images."""

    hidden_states: torch.Tensor
    """B×N×D tokens: prefix tokens, then the patch tokens in raster order."""
    block_kwargs: dict[str, Any] = field(default_factory=dict)
    """Computed once per forward from the images and handed to every block (DINOv3's rotary
    `position_embeddings`, SigLIP2's `attention_mask`); empty for most families."""


class BlockOutputs(tuple):
    """The outputs of blocks 0..k of one forward, with the `block_kwargs` they were computed with
    (what `ResolvedViT.run_block` needs to run a block again on these images)."""

    block_kwargs: dict[str, Any]

    def __new__(cls, outputs, block_kwargs: dict[str, Any]):
        self = super().__new__(cls, outputs)
        self.block_kwargs = block_kwargs
        return self


def _hf_embed(interpolation_flag: bool = True, pre_norm: str | None = None):
    """The tokens entering block 0, as the family's own forward computes them.

    `interpolation_flag`: whether the embeddings must be asked to interpolate the position embeddings
    at another image size than the model's (DINOv2's always do); `pre_norm`: a norm the forward
    applies after the embeddings (CLIP's `pre_layrnorm`).
    """

    def embed(backbone: nn.Module, pixel_values: torch.Tensor) -> Embedded:
        kwargs = {}
        if interpolation_flag:
            kwargs["interpolate_pos_encoding"] = pixel_values.shape[-1] != backbone.config.image_size
        hidden_states = backbone.embeddings(pixel_values, **kwargs)
        return Embedded(getattr(backbone, pre_norm)(hidden_states) if pre_norm else hidden_states)

    return embed


def _plain_embed(backbone: nn.Module, pixel_values: torch.Tensor) -> Embedded:
    return Embedded(backbone.embeddings(pixel_values))


def _dinov3_embed(backbone: nn.Module, pixel_values: torch.Tensor) -> Embedded:
    # RoPE: cos/sin of the patch grid, computed once from the images and given to every block.
    pixel_values = pixel_values.to(backbone.embeddings.patch_embeddings.weight.dtype)
    return Embedded(
        backbone.embeddings(pixel_values), {"position_embeddings": backbone.rope_embeddings(pixel_values)}
    )


def _siglip2_embed(backbone: nn.Module, pixel_values: torch.Tensor) -> Embedded:
    """NaFlex on a batch of same-size images: patchified as Siglip2ImageProcessor lays patches out
    (rows of patches, each patch row-major with the channels last), every patch valid."""
    patch = backbone.config.patch_size
    batch, channels, height, width = pixel_values.shape
    rows, columns = height // patch, width // patch
    patches = pixel_values.reshape(batch, channels, rows, patch, columns, patch).permute(0, 2, 4, 3, 5, 1)
    patches = patches.reshape(batch, rows * columns, patch * patch * channels)
    shapes = torch.tensor([[rows, columns]], device=pixel_values.device).expand(batch, 2)
    hidden_states = backbone.embeddings(patches, shapes)
    valid = torch.ones(batch, rows * columns, dtype=torch.long, device=pixel_values.device)
    mask = transformers.masking_utils.create_bidirectional_mask(
        config=backbone.config, inputs_embeds=hidden_states, attention_mask=valid
    )
    return Embedded(hidden_states, {"attention_mask": mask})


def _timm_embed(backbone: nn.Module, pixel_values: torch.Tensor) -> Embedded:
    # TimmWrapperModel's hidden states are B×C×H×W maps without the prefix tokens, so run the timm
    # model's own stem to read token features with them.
    vit = backbone.timm_model
    return Embedded(vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixel_values)))))


def _hf_run_block(block: nn.Module, hidden_states: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
    # The attention mask passed positionally (None unless the family computes one): CLIP's and
    # SigLIP's blocks require it, the others default it.
    others = {name: value for name, value in block_kwargs.items() if name != "attention_mask"}
    return block(hidden_states, block_kwargs.get("attention_mask"), **others)


def _timm_run_block(block: nn.Module, hidden_states: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
    return block(hidden_states)  # timm releases differ in what else a block's forward takes


def _hf_geometry(backbone: nn.Module) -> tuple[int, int, int]:
    config = backbone.config
    return int(config.image_size), int(config.patch_size), int(config.num_channels)


def _siglip2_geometry(backbone: nn.Module) -> tuple[int, int, int]:
    # NaFlex has no image size: its position-embedding grid (sqrt(num_patches) patches a side) is the native one.
    config = backbone.config
    side = int(config.num_patches**0.5)
    return side * int(config.patch_size), int(config.patch_size), int(config.num_channels)


def _timm_geometry(backbone: nn.Module) -> tuple[int, int, int]:
    embed = backbone.timm_model.patch_embed
    if embed.img_size[0] != embed.img_size[1] or embed.patch_size[0] != embed.patch_size[1]:
        raise ValueError(f"model: only square timm ViTs are supported, got img_size={embed.img_size}")
    return int(embed.img_size[0]), int(embed.patch_size[0]), int(embed.proj.in_channels)


def _timm_set_input_size(backbone: nn.Module, image_size: int) -> None:
    backbone.timm_model.set_input_size(img_size=(image_size, image_size))  # resamples the position embeddings


def _check_timm_model(backbone: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    vit = backbone.timm_model
    if not isinstance(vit, VisionTransformer):
        raise ValueError(
            f"model: timm {type(vit).__name__} ({backbone.config.architecture}) is not supported; timm models must be "
            "VisionTransformer (vit_*, deit*_, ...) with absolute position embeddings; EVA, rotary and hybrid models are not"
        )


def _check_radio_model(backbone: nn.Module) -> None:
    if backbone.config.video_temporal_patch_size is not None:
        raise ValueError("model: radio models with a video patch embedder are not supported; use an image-only C-RADIO")


def _hf_width(backbone: nn.Module) -> int:
    return int(backbone.config.hidden_size)


@dataclass(frozen=True)
class MLPLayout:
    """Paths inside a block to its MLP's linear layers: `down(act(up(x)))`, or `down(act(gate(x)) ⊙ up(x))`
    for a gated MLP."""

    up: str
    """The input projection (H×D weight): fc1, or the value projection of a gated MLP."""
    down: str
    """The output projection (D×H weight)."""
    gate: str | None = None
    """The gate projection (H×D weight) of a gated MLP; None for a plain one."""


@dataclass(frozen=True)
class MLPWeights:
    """One block's MLP, as SiNGER's nullspace reads it (the tensors are the block's own parameters)."""

    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None

    @property
    def gated(self) -> bool:
        return self.gate is not None


PLAIN_MLP = MLPLayout(up="mlp.fc1", down="mlp.fc2")
GATED_MLP = MLPLayout(up="mlp.up_proj", down="mlp.down_proj", gate="mlp.gate_proj")


@dataclass(frozen=True)
class Architecture:
    """Where one ViT family keeps what SiNGER reads."""

    blocks: str
    """Dotted path from the backbone to the `nn.ModuleList` of transformer blocks."""
    num_prefix_tokens: Callable[[nn.Module], int]
    """Tokens before the patch tokens (CLS/summary tokens, distillation token, registers), 0 when there are none."""
    num_class_tokens: Callable[[nn.Module], int] = lambda backbone: 1
    """How many of the prefix tokens, from the first, are CLS (summary) tokens; KD matches them, in
    order, with the other model's where both have them."""
    mlps: tuple[MLPLayout, ...] = (PLAIN_MLP,)
    """The MLP layouts the family's blocks may have; a block uses the first whose layers it holds."""
    embed: Callable[[nn.Module, torch.Tensor], Embedded] = field(default=_hf_embed())
    """The tokens (B×N×D) entering block 0 for a batch of images of any supported size, and the
    keyword arguments every block of that forward receives."""
    run_block: Callable[[nn.Module, torch.Tensor, dict[str, Any]], torch.Tensor] = field(default=_hf_run_block)
    """One block's output for B×N×D hidden states and the forward's `block_kwargs`."""
    geometry: Callable[[nn.Module], tuple[int, int, int]] = field(default=_hf_geometry)
    """(image size, patch size, input channels) the model was built for."""
    width: Callable[[nn.Module], int] = field(default=_hf_width)
    """Token width D."""
    set_input_size: Callable[[nn.Module, int], None] | None = None
    """Makes the model run at another image size; None: its forward interpolates position embeddings itself."""
    fixed_image_size: Callable[[nn.Module], bool] = lambda backbone: False
    """Whether the model reads only images of the size it was built for (a position-embedding table it cannot resample)."""
    input_normalization: Callable[[nn.Module], tuple[list[float], list[float]]] | None = None
    """(mean, std) a model normalises its pixels with inside its forward (C-RADIO), None for the
    usual models that expect normalised pixels. Such a model is fed pixels normalised with these
    statistics and its own normalisation is skipped (`embed`); it can only be a teacher."""
    check: Callable[[nn.Module], None] | None = None
    """Raises a one-line ValueError for a model of this family that the code cannot run."""


ARCHITECTURES: dict[str, Architecture] = {
    "vit": Architecture(blocks="layers", num_prefix_tokens=lambda m: 1),
    "deit": Architecture(blocks="layers", num_prefix_tokens=lambda m: 2),  # CLS + distillation token
    # Giant models (use_swiglu_ffn): gated MLPs.
    "dinov2": Architecture(
        blocks="encoder.layer",
        num_prefix_tokens=lambda m: 1,
        mlps=(PLAIN_MLP, GATED_MLP),
        embed=_hf_embed(interpolation_flag=False),
    ),
    "dinov2_with_registers": Architecture(
        blocks="encoder.layer",
        num_prefix_tokens=lambda m: 1 + m.config.num_register_tokens,
        mlps=(PLAIN_MLP, GATED_MLP),
        embed=_hf_embed(interpolation_flag=False),
    ),
    "clip_vision_model": Architecture(blocks="encoder.layers", num_prefix_tokens=lambda m: 1, embed=_hf_embed(pre_norm="pre_layrnorm")),
    "siglip_vision_model": Architecture(
        blocks="encoder.layers", num_prefix_tokens=lambda m: 0, num_class_tokens=lambda m: 0
    ),
    "timm_wrapper": Architecture(
        blocks="timm_model.blocks",
        num_prefix_tokens=lambda m: int(m.timm_model.num_prefix_tokens),
        num_class_tokens=lambda m: int(m.timm_model.cls_token is not None),
        embed=_timm_embed,
        run_block=_timm_run_block,
        geometry=_timm_geometry,
        width=lambda m: int(m.timm_model.embed_dim),
        set_input_size=_timm_set_input_size,
        check=_check_timm_model,
    ),
    # CLS + registers; RoPE computed once per forward; plain (ViT-S/B/L) or gated (S+, H+, 7B) MLPs.
    "dinov3_vit": Architecture(
        blocks="model.layer",
        num_prefix_tokens=lambda m: 1 + m.config.num_register_tokens,
        mlps=(GATED_MLP, MLPLayout(up="mlp.up_proj", down="mlp.down_proj")),
        embed=_dinov3_embed,
    ),
    # Several CLS ("summary") tokens, then registers; CPE position embeddings; normalises its input itself.
    "radio": Architecture(
        blocks="encoder.layer",
        num_prefix_tokens=lambda m: m.config.num_cls_tokens + m.config.num_registers,
        num_class_tokens=lambda m: m.config.num_cls_tokens,
        mlps=(PLAIN_MLP, GATED_MLP),
        # The input conditioner is skipped: the pixels arrive normalised with the model's own statistics
        # (`input_normalization`), as RADIO's `make_preprocessor_external` arranges.
        embed=_plain_embed,
        input_normalization=lambda m: (list(m.config.norm_mean), list(m.config.norm_std)),
        check=_check_radio_model,
    ),
    # NaFlex: patchified inputs, position embeddings resized to the patch grid; no CLS.
    "siglip2_vision_model": Architecture(
        blocks="encoder.layers",
        num_prefix_tokens=lambda m: 0,
        num_class_tokens=lambda m: 0,
        embed=_siglip2_embed,
        geometry=_siglip2_geometry,
    ),
    # RMSNorm, SwiGLU, no CLS.
    "aimv2_vision_model": Architecture(
        blocks="encoder.layers",
        num_prefix_tokens=lambda m: 0,
        num_class_tokens=lambda m: 0,
        mlps=(MLPLayout(up="ffn.up_proj", down="ffn.down_proj", gate="ffn.gate_proj"),),
        embed=_plain_embed,
        fixed_image_size=lambda m: not m.config.is_native,
    ),
    "metaclip_2_vision_model": Architecture(
        blocks="encoder.layers",
        num_prefix_tokens=lambda m: 1,
        embed=_hf_embed(pre_norm="pre_layrnorm"),
    ),
}

VISION_TOWERS: dict[str, str] = {
    "clip": "vision_model",
    "siglip": "vision_model",
    "siglip2": "vision_model",
    "aimv2": "vision_model",
    "metaclip_2": "vision_model",
}
"""Vision-language models (`AutoModel` on a CLIP checkpoint gives `CLIPModel`): the attribute holding
the vision model, whose own `ARCHITECTURES` entry applies."""


SUPPORTED_MODEL_TYPES = tuple(sorted([*ARCHITECTURES, *VISION_TOWERS]))


@dataclass(frozen=True)
class ResolvedViT:
    """A model bound to its table entry: the backbone (no task head, vision tower only) and its facts."""

    backbone: nn.Module
    architecture: Architecture
    blocks: nn.ModuleList
    num_prefix_tokens: int
    num_class_tokens: int
    image_size: int
    """The size the model was built for (its position embeddings)."""
    patch_size: int
    num_channels: int
    width: int

    @property
    def model_type(self) -> str:
        return model_type_of(self.backbone)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def check_blocks(self, blocks: list[int], argument: str) -> None:
        """One-line error naming `argument` unless every index is a block of this model."""
        if any(not 0 <= block < self.depth for block in blocks):
            bad = next(block for block in blocks if not 0 <= block < self.depth)
            raise ValueError(
                f"{argument}: block {bad} is out of range for a {self.depth}-block {self.model_type} model (valid: 0..{self.depth - 1})"
            )

    @property
    def has_class_token(self) -> bool:
        return self.num_class_tokens > 0

    @property
    def input_normalization(self) -> tuple[list[float], list[float]] | None:
        """(mean, std) the model normalises its pixels with itself; its inputs are fed normalised with them."""
        normalization = self.architecture.input_normalization
        return None if normalization is None else normalization(self.backbone)

    def embed(self, pixel_values: torch.Tensor) -> Embedded:
        """The tokens entering block 0 and the keyword arguments every block of this forward gets."""
        return self.architecture.embed(self.backbone, pixel_values)

    def block_outputs(self, pixel_values: torch.Tensor, last_block: int | None = None) -> BlockOutputs:
        """The outputs (B×N×D, before the final norm) of blocks 0..`last_block` (default: all).

        Stopping at the deepest block a loss reads saves the teacher the blocks after it, and its
        final norm and head, which no distillation loss reads.
        """
        last_block = self.depth - 1 if last_block is None else last_block
        self.check_blocks([last_block], "last_block")
        embedded = self.embed(pixel_values)
        hidden_states, outputs = embedded.hidden_states, []
        for index in range(last_block + 1):
            hidden_states = self.run_block(index, hidden_states, embedded.block_kwargs)
            outputs.append(hidden_states)
        return BlockOutputs(outputs, embedded.block_kwargs)

    def run_block(self, index: int, hidden_states: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
        """Block `index` on `hidden_states`, with the `block_kwargs` of the forward they come from
        (`BlockOutputs.block_kwargs`, `Embedded.block_kwargs`)."""
        output = self.architecture.run_block(self.blocks[index], hidden_states, block_kwargs)
        return output[0] if isinstance(output, tuple) else output

    def mlp(self, index: int) -> MLPWeights:
        """The MLP weights of block `index`, unwrapping a PEFT layer around the block.

        Raises a one-line ValueError when the block's MLP has none of the family's layouts (fused
        gate-and-up projections, parallel blocks): SiNGER's nullspace is defined from separate projections.
        """
        block = self.blocks[index]
        block = getattr(block, "base_layer", block)
        for layout in self.architecture.mlps:
            paths = {"up": layout.up, "down": layout.down, **({"gate": layout.gate} if layout.gate else {})}
            layers = {name: _submodule_or_none(block, path) for name, path in paths.items()}
            if all(isinstance(layer, nn.Linear) for layer in layers.values()) and _shapes_fit(layers, self.width):
                gate = layers["gate"].weight if "gate" in layers else None
                return MLPWeights(up=layers["up"].weight, down=layers["down"].weight, gate=gate)
        mlp = getattr(block, "mlp", None)
        expected = " or ".join(_describe(layout) for layout in self.architecture.mlps)
        raise ValueError(
            f"teacher: block {index} of this {self.model_type} model has a {type(mlp).__name__ if mlp else type(block).__name__} "
            f"MLP, not {expected}; SiNGER's nullspace adapter needs those separate projections (fused gate-and-up "
            "layers and parallel blocks are not supported; --method fitnet or vitkd need no MLP)"
        )

    def check_image_size(self, image_size: int, argument: str = "model") -> None:
        """One-line error unless the model can read `image_size` images (weights not needed)."""
        if image_size % self.patch_size:
            raise ValueError(f"{argument}: image size {image_size} is not a multiple of its patch size {self.patch_size}")
        if image_size != self.image_size and self.architecture.fixed_image_size(self.backbone):
            raise ValueError(
                f"{argument}: this {self.model_type} model has a fixed {self.image_size}px position-embedding table and "
                f"cannot read {image_size}px images; use an image processor of {self.image_size}px"
            )

    def run_at(self, image_size: int, argument: str = "model") -> None:
        """Prepare the model to read `image_size` images (its forward interpolates, or the family resizes it)."""
        self.check_image_size(image_size, argument)
        if image_size != self.image_size and self.architecture.set_input_size is not None:
            self.architecture.set_input_size(self.backbone, image_size)


def _shapes_fit(layers: dict[str, nn.Linear], width: int) -> bool:
    hidden = layers["up"].out_features
    return (
        layers["up"].in_features == layers["down"].out_features == width
        and layers["down"].in_features == hidden
        and ("gate" not in layers or (layers["gate"].in_features, layers["gate"].out_features) == (width, hidden))
    )


def _describe(layout: MLPLayout) -> str:
    if layout.gate is None:
        return f"{layout.up} → activation → {layout.down}"
    return f"{layout.down}(act({layout.gate}) ⊙ {layout.up})"


def _submodule_or_none(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def backbone_of(model: nn.Module) -> nn.Module:
    """The model without its task head (`ViTForImageClassification` → its `ViTModel`) or text tower
    (`CLIPModel` → its `CLIPVisionModel`): the outermost module that holds the family's blocks
    (`base_model` of a DINOv3 model is its encoder alone, without the embeddings)."""
    model = getattr(model, "get_base_model", lambda: model)()  # a PeftModel → the wrapped model
    model_type = model_type_of(model)
    if model_type in VISION_TOWERS:
        return backbone_of(getattr(model, VISION_TOWERS[model_type]))
    if model_type in ARCHITECTURES and _submodule_or_none(model, ARCHITECTURES[model_type].blocks) is not None:
        return model
    return getattr(model, "base_model", model)


def load_backbone(name_or_path: str, trust_remote_code: bool = False, use_safetensors: bool = True) -> nn.Module:
    """The backbone of a checkpoint (`backbone_of`), loaded with the class it was saved from.

    `AutoModel` on a classification checkpoint would build a model with other parts (a pooler, no
    classifier) and report them missing and unexpected; loading the saved class and dropping its head
    (or a CLIP model's text tower) loads every weight as written.
    """
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    saved_as = (getattr(config, "architectures", None) or [""])[0]
    model_class = getattr(transformers, saved_as, None) if saved_as else None  # None: remote code, or no record
    model = (model_class or AutoModel).from_pretrained(
        name_or_path, config=config, trust_remote_code=trust_remote_code, use_safetensors=use_safetensors
    )
    return backbone_of(model)


def resolve_vit(model: nn.Module, argument: str = "model") -> ResolvedViT:
    """Bind an HF ViT to its table entry, or fail naming `argument` and the supported families."""
    backbone = backbone_of(model)
    model_type = model_type_of(backbone)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{argument}: unsupported model type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    architecture = ARCHITECTURES[model_type]
    if architecture.check is not None:
        try:
            architecture.check(backbone)
        except ValueError as error:
            raise ValueError(str(error).replace("model:", f"{argument}:", 1)) from None
    image_size, patch_size, num_channels = architecture.geometry(backbone)
    return ResolvedViT(
        backbone=backbone,
        architecture=architecture,
        blocks=backbone.get_submodule(architecture.blocks),
        num_prefix_tokens=architecture.num_prefix_tokens(backbone),
        num_class_tokens=architecture.num_class_tokens(backbone),
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        width=architecture.width(backbone),
    )
