"""Tiny offline models shared by the tests (no Hub access anywhere)."""

import pytest
import torch
import transformers

IMAGE, PATCH = 32, 8


def tiny_config(config_class, hidden=32, layers=4, **kwargs):
    return config_class(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        image_size=IMAGE,
        patch_size=PATCH,
        layer_norm_eps=1e-6,
        **kwargs,
    )


def make_vit(hidden=48, layers=6, seed=0, classifier=False):
    torch.manual_seed(seed)
    config = tiny_config(transformers.ViTConfig, hidden, layers)
    if classifier:
        return transformers.ViTForImageClassification(config)
    return transformers.ViTModel(config, add_pooling_layer=False)


TEACHER_FACTORIES = {
    "vit": lambda: make_vit(classifier=True),
    "deit": lambda: transformers.DeiTModel(tiny_config(transformers.DeiTConfig, 48, 6), add_pooling_layer=False),
    "dinov2": lambda: transformers.Dinov2Model(tiny_config(transformers.Dinov2Config, 48, 6)),
    "dinov2_with_registers": lambda: transformers.Dinov2WithRegistersModel(
        tiny_config(transformers.Dinov2WithRegistersConfig, 48, 6, num_register_tokens=4)
    ),
    "clip_vision_model": lambda: transformers.CLIPVisionModel(tiny_config(transformers.CLIPVisionConfig, 48, 6)),
    "timm_wrapper": lambda: transformers.TimmWrapperModel(
        transformers.TimmWrapperConfig(
            architecture="vit_tiny_patch16_224",
            model_args=dict(img_size=IMAGE, patch_size=PATCH, embed_dim=48, depth=6, num_heads=2),
        )
    ),
}


_NEWER = dict(hidden_size=48, num_hidden_layers=6, num_attention_heads=2, patch_size=PATCH)
NEWER_TEACHER_FACTORIES = {
    "dinov3_vit": lambda: transformers.DINOv3ViTModel(
        transformers.DINOv3ViTConfig(**_NEWER, intermediate_size=96, image_size=IMAGE, layerscale_value=0.5)
    ),
    "dinov3_vit_gated": lambda: transformers.DINOv3ViTModel(
        transformers.DINOv3ViTConfig(**_NEWER, intermediate_size=96, image_size=IMAGE, layerscale_value=0.5, use_gated_mlp=True)
    ),
    "radio": lambda: transformers.RadioModel(transformers.RadioConfig(**_NEWER, mlp_ratio=2.0, image_size=IMAGE, max_img_size=2 * IMAGE)),
    "radio_swiglu": lambda: transformers.RadioModel(
        transformers.RadioConfig(**_NEWER, mlp_ratio=2.0, image_size=IMAGE, max_img_size=2 * IMAGE, use_swiglu_ffn=True)
    ),
    "siglip2_vision_model": lambda: transformers.Siglip2VisionModel(
        transformers.Siglip2VisionConfig(**_NEWER, intermediate_size=96, num_patches=(IMAGE // PATCH) ** 2)
    ),
    "aimv2_vision_model": lambda: transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**_NEWER, intermediate_size=96, image_size=IMAGE)),
    "metaclip_2_vision_model": lambda: transformers.MetaClip2VisionModel(
        transformers.MetaClip2VisionConfig(**_NEWER, intermediate_size=96, image_size=IMAGE)
    ),
}
"""The newer families' vision models, in memory (tests/standins.py writes them as Hub folders)."""


@pytest.fixture
def images():
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def distill():
    """The distillation command (`scripts/distill.py`, `singer-distill`): a test calls its main(argv) as the command line does."""
    from singer_hf.commands import distill

    return distill
