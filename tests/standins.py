"""Offline stand-ins for what users load from the Hub: tiny model folders of each family, written by
`save_pretrained` with the image processor a Hub checkpoint of that family ships, and a local
Parquet image dataset. The script under test loads them exactly as it would load Hub ids."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
import transformers

TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6)
TIMM_TINY = dict(embed_dim=64, num_heads=2)  # wide enough for the recipes' rank 64


def write_images(path: Path, count: int = 24, size: int = 40, column: str = "image") -> Path:
    """A Parquet file of random JPEG photos (`column`) and labels, like an ImageNet shard."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    data = datasets.Dataset.from_dict({column: images, "label": [i % 10 for i in range(count)]})
    data.cast_column(column, datasets.Image()).to_parquet(str(path))
    return path


def save_timm(folder: Path, architecture: str, image_size: int = 32, patch_size: int = 8, **model_args) -> Path:
    """A timm checkpoint folder as the Hub's `timm/<architecture>.<tag>` repositories hold it: the
    architecture's own structure (depth, class/register tokens, LayerScale, MLP) at a tiny width."""
    pretrained_cfg = dict(input_size=(3, image_size, image_size), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0)
    config = transformers.TimmWrapperConfig(
        architecture=architecture,
        pretrained_cfg=pretrained_cfg,
        model_args=dict(img_size=image_size, patch_size=patch_size, **{**TIMM_TINY, **model_args}),
    )
    torch.manual_seed(0)
    transformers.TimmWrapperModel(config).save_pretrained(folder)
    return folder


def save_hf(folder: Path, model_class, config, processor) -> Path:
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def vit_processor(size: int) -> transformers.ViTImageProcessor:
    return transformers.ViTImageProcessor(size={"height": size, "width": size})


def cropping_processor(resize: int, crop: int) -> transformers.BitImageProcessor:
    """What DINOv2 checkpoints ship: resize the shorter side, then centre-crop."""
    return transformers.BitImageProcessor(
        size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop}, do_center_crop=True
    )


def hf_families(image: int = 32, patch: int = 8, layers: int = 6) -> dict[str, callable]:
    """Every transformers family in the architecture table, as the class `AutoModel` gives for a Hub
    checkpoint of it: name → function(folder) writing the stand-in."""
    common = dict(TINY, num_hidden_layers=layers, image_size=image, patch_size=patch)
    vision = dict(common)
    vision.pop("layer_norm_eps")
    return {
        # A classification checkpoint (as most Hub ViTs are), loaded by the script as a backbone.
        "vit": lambda folder: save_hf(
            folder, transformers.ViTForImageClassification, transformers.ViTConfig(**common, num_labels=3), vit_processor(image)
        ),
        "deit": lambda folder: save_hf(folder, transformers.DeiTModel, transformers.DeiTConfig(**common), vit_processor(image)),
        # The Hub's DINOv2 configs say 518 px while their processors crop 224: here 64 vs 32.
        "dinov2": lambda folder: save_hf(
            folder, transformers.Dinov2Model, transformers.Dinov2Config(**{**common, "image_size": 2 * image}),
            cropping_processor(image + 4, image),
        ),
        "dinov2_with_registers": lambda folder: save_hf(
            folder,
            transformers.Dinov2WithRegistersModel,
            transformers.Dinov2WithRegistersConfig(**{**common, "image_size": 2 * image}, num_register_tokens=4),
            cropping_processor(image + 4, image),
        ),
        # AutoModel on a CLIP checkpoint gives CLIPModel, text tower included.
        "clip": lambda folder: save_hf(
            folder,
            transformers.CLIPModel,
            transformers.CLIPConfig(text_config=dict(vision, num_hidden_layers=2), vision_config=vision),
            transformers.CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image}),
        ),
        # SigLIP has no CLS token: every token is a patch.
        "siglip": lambda folder: save_hf(
            folder,
            transformers.SiglipVisionModel,
            transformers.SiglipVisionConfig(**vision),
            transformers.SiglipImageProcessor(size={"height": image, "width": image}),
        ),
    }


def newer_families(image: int = 32, patch: int = 8, layers: int = 6, width: int = 32) -> dict[str, callable]:
    """The teachers distilled from now, with the prefix tokens, MLPs and processors their Hub
    checkpoints have: name → function(folder) writing the stand-in."""
    blocks = dict(hidden_size=width, num_attention_heads=2, num_hidden_layers=layers)
    vision = dict(blocks, intermediate_size=2 * width, patch_size=patch)
    clip_processor = transformers.CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    text = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64)

    def dinov3(gated: bool):
        config = transformers.DINOv3ViTConfig(**vision, image_size=image, num_register_tokens=4, use_gated_mlp=gated)
        processor = transformers.DINOv3ViTImageProcessor(size={"height": image, "width": image})
        return lambda folder: save_hf(folder, transformers.DINOv3ViTModel, config, processor)

    return {
        # ViT-S/B/L (plain MLP) and ViT-S+/H+/7B (gated MLP): CLS + 4 registers, RoPE, LayerScale.
        "dinov3_vit": dinov3(gated=False),
        "dinov3_vit_gated": dinov3(gated=True),
        # C-RADIO: 3 summary tokens + 7 registers, CPE position embeddings cropped from a larger table,
        # normalises [0, 1] pixels inside the model, so its processor does not normalise.
        "radio": lambda folder: save_hf(
            folder,
            transformers.RadioModel,
            transformers.RadioConfig(**blocks, mlp_ratio=2.0, image_size=image, patch_size=patch, max_img_size=4 * image),
            transformers.CLIPImageProcessor(
                size={"shortest_edge": image}, crop_size={"height": image, "width": image}, do_normalize=False
            ),
        ),
        # SigLIP2 NaFlex: AutoModel gives Siglip2Model (text tower included); the processor patchifies
        # up to max_num_patches patches; no CLS token.
        "siglip2": lambda folder: save_hf(
            folder,
            transformers.Siglip2Model,
            transformers.Siglip2Config(text_config=text, vision_config=dict(vision, num_patches=(image // patch) ** 2)),
            transformers.Siglip2ImageProcessor(patch_size=patch, max_num_patches=(image // patch) ** 2),
        ),
        # AIMv2 (apple/aimv2-*-patch14-224 are vision models): RMSNorm, SwiGLU, no CLS, fixed position table.
        "aimv2": lambda folder: save_hf(
            folder, transformers.Aimv2VisionModel, transformers.Aimv2VisionConfig(**vision, image_size=image), clip_processor
        ),
        "metaclip_2": lambda folder: save_hf(
            folder,
            transformers.MetaClip2Model,
            transformers.MetaClip2Config(text_config=dict(text, bos_token_id=1, eos_token_id=2), vision_config=dict(vision, image_size=image)),
            clip_processor,
        ),
    }


def hub_teacher(hub_id: str, folder: Path) -> Path | None:
    """A stand-in for a recipe's Hub teacher of a newer family: its family, depth, prefix tokens, MLP
    and patch size, at width 64 (the recipes' rank 64 must fit); None for other ids."""
    stand_ins = {
        "facebook/dinov3-vitl16-pretrain-lvd1689m": ("dinov3_vit", dict(layers=24)),
        "nvidia/C-RADIOv4-H": ("radio", dict(layers=32)),
        "google/siglip2-so400m-patch16-naflex": ("siglip2", dict(layers=27)),
        # /14 like the real one, at a size a /16 student reads too.
        "apple/aimv2-large-patch14-224": ("aimv2", dict(layers=24, image=112, patch=14)),
    }
    if hub_id not in stand_ins:
        return None
    family, shape = stand_ins[hub_id]
    newer_families(width=64, **shape)[family](folder)
    return folder
