"""Per-architecture facts SiNGER needs, in one table.

A new ViT family is one entry in `ARCHITECTURES`: where its blocks live, which prefix tokens (CLS,
distillation token, registers) precede the patch tokens, how images become the tokens entering block 0,
and how to run one block. Everything else in the package goes through `resolve_vit`.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file


def _hf_embed(interpolation_flag: bool = True, pre_norm: str | None = None):
    """The tokens entering block 0, as the family's own forward computes them.

    `interpolation_flag`: whether the embeddings must be asked to interpolate the position embeddings
    at another image size than the model's (DINOv2's always do); `pre_norm`: a norm the forward
    applies after the embeddings (CLIP's `pre_layrnorm`).
    """

    def embed(backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if interpolation_flag:
            kwargs["interpolate_pos_encoding"] = pixel_values.shape[-1] != backbone.config.image_size
        hidden_states = backbone.embeddings(pixel_values, **kwargs)
        return getattr(backbone, pre_norm)(hidden_states) if pre_norm else hidden_states

    return embed


def _timm_embed(backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    # TimmWrapperModel's hidden states are B×C×H×W maps without the prefix tokens, so run the timm
    # model's own stem to read token features with them.
    vit = backbone.timm_model
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixel_values))))


def _hf_run_block(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    # The attention mask passed positionally as None: CLIP's and SigLIP's blocks require it, the others default it.
    return block(hidden_states, None)


def _timm_run_block(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return block(hidden_states)  # timm releases differ in what else a block's forward takes


def _hf_geometry(backbone: nn.Module) -> tuple[int, int, int]:
    config = backbone.config
    return int(config.image_size), int(config.patch_size), int(config.num_channels)


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


def _hf_width(backbone: nn.Module) -> int:
    return int(backbone.config.hidden_size)


@dataclass(frozen=True)
class Architecture:
    """Where one ViT family keeps what SiNGER reads."""

    blocks: str
    """Dotted path from the backbone to the `nn.ModuleList` of transformer blocks."""
    num_prefix_tokens: Callable[[nn.Module], int]
    """Tokens before the patch tokens (CLS, distillation token, registers), 0 when there are none."""
    has_class_token: Callable[[nn.Module], bool] = lambda backbone: True
    """Whether the first token is a CLS token (KD compares CLS to CLS only when both models have one)."""
    fc1: str = "mlp.fc1"
    """Path inside a block to the MLP's first linear layer (H×D weight)."""
    fc2: str = "mlp.fc2"
    """Path inside a block to the MLP's second linear layer (D×H weight)."""
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] = field(default=_hf_embed())
    """The tokens (B×N×D) entering block 0 for a batch of images of any supported size."""
    run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor] = field(default=_hf_run_block)
    """One block's output for B×N×D hidden states."""
    geometry: Callable[[nn.Module], tuple[int, int, int]] = field(default=_hf_geometry)
    """(image size, patch size, input channels) the model was built for."""
    width: Callable[[nn.Module], int] = field(default=_hf_width)
    """Token width D."""
    set_input_size: Callable[[nn.Module, int], None] | None = None
    """Makes the model run at another image size; None: its forward interpolates position embeddings itself."""
    check: Callable[[nn.Module], None] | None = None
    """Raises a one-line ValueError for a model of this family that the code cannot run."""


ARCHITECTURES: dict[str, Architecture] = {
    "vit": Architecture(blocks="layers", num_prefix_tokens=lambda m: 1),
    "deit": Architecture(blocks="layers", num_prefix_tokens=lambda m: 2),  # CLS + distillation token
    "dinov2": Architecture(
        blocks="encoder.layer", num_prefix_tokens=lambda m: 1, embed=_hf_embed(interpolation_flag=False)
    ),
    "dinov2_with_registers": Architecture(
        blocks="encoder.layer",
        num_prefix_tokens=lambda m: 1 + m.config.num_register_tokens,
        embed=_hf_embed(interpolation_flag=False),
    ),
    "clip_vision_model": Architecture(blocks="encoder.layers", num_prefix_tokens=lambda m: 1, embed=_hf_embed(pre_norm="pre_layrnorm")),
    "siglip_vision_model": Architecture(
        blocks="encoder.layers", num_prefix_tokens=lambda m: 0, has_class_token=lambda m: False
    ),
    "timm_wrapper": Architecture(
        blocks="timm_model.blocks",
        num_prefix_tokens=lambda m: int(m.timm_model.num_prefix_tokens),
        has_class_token=lambda m: m.timm_model.cls_token is not None,
        embed=_timm_embed,
        run_block=_timm_run_block,
        geometry=_timm_geometry,
        width=lambda m: int(m.timm_model.embed_dim),
        set_input_size=_timm_set_input_size,
        check=_check_timm_model,
    ),
}

VISION_TOWERS: dict[str, str] = {"clip": "vision_model", "siglip": "vision_model"}
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
    has_class_token: bool
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

    def block_outputs(self, pixel_values: torch.Tensor, last_block: int | None = None) -> tuple[torch.Tensor, ...]:
        """The outputs (B×N×D, before the final norm) of blocks 0..`last_block` (default: all).

        Stopping at the deepest block a loss reads saves the teacher the blocks after it, and its
        final norm and head, which no distillation loss reads.
        """
        last_block = self.depth - 1 if last_block is None else last_block
        if not 0 <= last_block < self.depth:
            raise ValueError(f"last_block: must be in 0..{self.depth - 1} for a {self.depth}-block model, got {last_block}")
        hidden_states = self.architecture.embed(self.backbone, pixel_values)
        outputs = []
        for index in range(last_block + 1):
            hidden_states = self.run_block(index, hidden_states)
            outputs.append(hidden_states)
        return tuple(outputs)

    def run_block(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.architecture.run_block(self.blocks[index], hidden_states)
        return output[0] if isinstance(output, tuple) else output

    def mlp_weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_fc1: H×D, W_fc2: D×H) of block `index`, unwrapping a PEFT layer around the block.

        Raises a one-line ValueError when the block's MLP is not fc1 → activation → fc2 (gated SwiGLU
        MLPs, fused parallel blocks): SiNGER's nullspace is defined for that MLP only.
        """
        block = self.blocks[index]
        block = getattr(block, "base_layer", block)
        fc1 = _submodule_or_none(block, self.architecture.fc1)
        fc2 = _submodule_or_none(block, self.architecture.fc2)
        plain = (
            isinstance(fc1, nn.Linear)
            and isinstance(fc2, nn.Linear)
            and fc1.out_features == fc2.in_features
            and fc1.in_features == fc2.out_features == self.width
        )
        if not plain:
            mlp = getattr(block, "mlp", None)
            raise ValueError(
                f"teacher: block {index} of this {self.model_type} model has a {type(mlp).__name__ if mlp else type(block).__name__} "
                f"MLP, not {self.architecture.fc1} → activation → {self.architecture.fc2}; SiNGER's nullspace adapter needs "
                "that plain two-layer MLP (gated SwiGLU MLPs and fused parallel blocks are not supported; "
                "--method fitnet or vitkd need no MLP)"
            )
        return fc1.weight, fc2.weight

    def run_at(self, image_size: int) -> None:
        """Prepare the model to read `image_size` images (its forward interpolates, or the family resizes it)."""
        if image_size != self.image_size and self.architecture.set_input_size is not None:
            self.architecture.set_input_size(self.backbone, image_size)


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
    (`CLIPModel` → its `CLIPVisionModel`)."""
    model = getattr(model, "get_base_model", lambda: model)()  # a PeftModel → the wrapped model
    if model_type_of(model) in VISION_TOWERS:
        return backbone_of(getattr(model, VISION_TOWERS[model_type_of(model)]))
    if model_type_of(model) == "timm_wrapper":
        return model  # the wrapper itself reads the timm model; its base_model is the raw timm module
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
    model = load_pretrained(
        model_class or AutoModel, name_or_path, config=config, trust_remote_code=trust_remote_code, use_safetensors=use_safetensors
    )
    return backbone_of(model)


def load_pretrained(model_class, name_or_path: str, **kwargs) -> nn.Module:
    """`model_class.from_pretrained(name_or_path, **kwargs)`, without a pooler when the checkpoint has none
    (`without_pooler`)."""
    found = without_pooler(model_class, name_or_path, kwargs.get("config"), kwargs.get("trust_remote_code", False))
    return model_class.from_pretrained(name_or_path, **{**found, **kwargs})


def without_pooler(model_class, name_or_path: str, config=None, trust_remote_code: bool = False) -> dict:
    """`{"add_pooling_layer": False}` when `model_class` (or the class an Auto class builds) takes that
    option and the checkpoint holds no pooler weights, else `{}`: the `from_pretrained` arguments that
    load it as saved.

    Distillation trains no pooler, so students are built and saved without one; `from_pretrained`
    would otherwise add a newly initialised pooler and report its weights missing.
    """
    target = model_class
    if hasattr(model_class, "_model_mapping"):  # an Auto class: the class it builds for this config
        config = config or AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        target = model_class._model_mapping.get(type(config), None)
    if target is None or "add_pooling_layer" not in inspect.signature(target.__init__).parameters:
        return {}
    saved = saved_weight_names(name_or_path)
    if saved is None or any(re.match(r"(.+\.)?pooler\.", name) for name in saved):
        return {}
    return {"add_pooling_layer": False}


def saved_weight_names(name_or_path: str) -> list[str] | None:
    """Names of the safetensors weights of a folder or (cached or downloadable) Hub checkpoint; None if unknown."""
    quiet = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
    index = cached_file(name_or_path, SAFE_WEIGHTS_INDEX_NAME, **quiet)
    if index is not None:
        return list(json.loads(Path(index).read_text())["weight_map"])
    single = cached_file(name_or_path, SAFE_WEIGHTS_NAME, **quiet)
    if single is None:
        return None
    with safe_open(single, "pt") as weights:
        return list(weights.keys())


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
        has_class_token=architecture.has_class_token(backbone),
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        width=architecture.width(backbone),
    )
