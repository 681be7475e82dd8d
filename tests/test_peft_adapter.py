"""SiNGER as a PEFT method: registration, injection, save/load, nullspace initialisation."""

import importlib.metadata
import json

import peft
import pytest
import torch
from conftest import NEWER_TEACHER_FACTORIES, TEACHER_FACTORIES, make_vit
from packaging.version import Version
from peft.utils import PeftType

import singer_hf
from singer_hf import SingerConfig, SingerLayer, nullspace_basis
from singer_hf.tuner.registration import register


def test_registration_is_idempotent_and_on_a_pinned_peft():
    register()  # a second import-time registration must not raise
    assert PeftType("SINGER") is PeftType.SINGER
    assert "SINGER" in [member.value for member in PeftType]
    assert Version("0.21") <= Version(importlib.metadata.version("peft")) < Version("0.22")


def test_get_peft_model_wraps_the_distilled_blocks_only():
    model = peft.get_peft_model(make_vit(), SingerConfig(layers=[4, 2], rank=8))
    assert sorted(model.base_model.singer_layers) == [2, 4]
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("singer_" in name for name in trainable)
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * 48 * 8  # W_d and W_u, two layers


@pytest.mark.parametrize("family", sorted({**TEACHER_FACTORIES, **NEWER_TEACHER_FACTORIES}))
def test_adapter_leaves_teacher_outputs_unchanged(family, images):
    torch.manual_seed(0)
    teacher = {**TEACHER_FACTORIES, **NEWER_TEACHER_FACTORIES}[family]().eval()
    resolved = singer_hf.resolve_vit(teacher)
    before = [f.clone() for f in resolved.block_outputs(images)]
    model = peft.get_peft_model(teacher, SingerConfig(layers=[3, 5], rank=4, null_threshold=1.0))
    after = singer_hf.resolve_vit(model).block_outputs(images)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # ...while the side branch does change the patch tokens it refines.
    refined = model.base_model.singer_layers[3].refine(after[3])
    assert not torch.allclose(refined, after[3])


def test_save_and_load_round_trip(tmp_path, images):
    config = SingerConfig(layers=[2, 5], rank=6, null_threshold=0.3, adapter_init="nullspace", adapter_seed=7)
    model = peft.get_peft_model(make_vit(seed=3), config)
    with torch.no_grad():  # move away from the deterministic init so loading must really read the file
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SINGER"

    loaded_config = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded_config, SingerConfig)
    for field in ("layers", "rank", "null_threshold", "adapter_init", "adapter_seed", "target_modules"):
        assert getattr(loaded_config, field) == getattr(config, field)

    loaded = peft.PeftModel.from_pretrained(make_vit(seed=3), tmp_path)
    saved_state = {k: v for k, v in model.state_dict().items() if "singer_" in k}
    loaded_state = loaded.state_dict()
    assert len(saved_state) == 4
    assert all(torch.equal(value, loaded_state[key]) for key, value in saved_state.items())
    features = singer_hf.resolve_vit(loaded).block_outputs(images)[2]
    assert torch.equal(
        loaded.base_model.singer_layers[2].refine(features), model.base_model.singer_layers[2].refine(features)
    )


def test_refine_touches_patch_tokens_only(images):
    teacher = TEACHER_FACTORIES["dinov2_with_registers"]()
    model = peft.get_peft_model(teacher, SingerConfig(layers=[4], rank=4, adapter_init="random"))
    layer = model.base_model.singer_layers[4]
    assert layer.num_prefix_tokens == 5  # CLS + 4 registers
    features = torch.randn(2, 5 + 16, 48)
    refined = layer.refine(features)
    assert torch.equal(refined[:, :5], features[:, :5])
    x = features[:, 5:]
    expected = x + (x @ layer.singer_down["default"]) @ layer.singer_up["default"]
    torch.testing.assert_close(refined[:, 5:], expected)


def test_nullspace_basis_follows_the_spec():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    sigma = torch.tensor([5.0, 4, 3, 2, 1, 0.9, 0.5, 0.3, 0.2, 0.1, 0.04, 0.03, 0.02, 0.01, 0.005, 0.001], dtype=torch.float64)
    matrix = q @ torch.diag(sigma) @ torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0].T
    # 6 values below τ = 0.05: with r = 4 the basis is the first four of them (descending σ).
    basis = nullspace_basis(matrix, rank=4, threshold=0.05)
    expected = q[:, 10:14].T.float()
    assert torch.allclose(basis.abs(), expected.abs(), atol=1e-5)
    # r = 8 > |K| = 6: the six directions, then two seeded random unit rows.
    first = nullspace_basis(matrix, rank=8, threshold=0.05, generator=torch.Generator().manual_seed(1))
    second = nullspace_basis(matrix, rank=8, threshold=0.05, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    assert torch.allclose(first[:6].abs(), q[:, 10:16].T.float().abs(), atol=1e-5)
    assert torch.allclose(first.norm(dim=1), torch.ones(8))
    # τ is absolute: 0.035 keeps the five values 0.03 … 0.001.
    assert singer_hf.nullspace_directions(matrix, 0.035).shape[0] == 5
    with pytest.warns(UserWarning, match="no singular value below"):
        nullspace_basis(matrix, rank=2, threshold=1e-6)


def test_random_padding_is_seeded_per_layer():
    make = lambda seed: peft.get_peft_model(make_vit(), SingerConfig(layers=[2, 4], rank=4, adapter_init="random", adapter_seed=seed))  # noqa: E731
    a, b, c = make(0).base_model.singer_layers, make(0).base_model.singer_layers, make(1).base_model.singer_layers
    assert torch.equal(a[2].singer_up["default"], b[2].singer_up["default"])
    assert not torch.equal(a[2].singer_up["default"], a[4].singer_up["default"])
    assert not torch.equal(a[2].singer_up["default"], c[2].singer_up["default"])


def test_nullspace_init_counts_the_directions_it_found():
    teacher = make_vit()
    model = peft.get_peft_model(teacher, SingerConfig(layers=[2, 5], rank=8, null_threshold=1e9))
    assert all(layer.nullspace_row_count["default"] == 8 for layer in model.base_model.singer_layers.values())
    assert isinstance(model.base_model.singer_layers[2], SingerLayer)


# -- the rest of PEFT's BaseTuner contract ---------------------------------------------------------
def _plain_block_types(model):
    return {type(block).__name__ for block in singer_hf.resolve_vit(model).blocks}


@pytest.mark.parametrize("method", ["unload", "merge_and_unload"])
def test_unload_returns_the_plain_teacher(method, images):
    teacher = make_vit().eval()
    before = [f.clone() for f in singer_hf.resolve_vit(teacher).block_outputs(images)]
    model = peft.get_peft_model(teacher, SingerConfig(layers=[2, 5], rank=4))
    plain = getattr(model, method)()
    assert type(plain).__name__ == "ViTModel" and _plain_block_types(plain) == {"ViTLayer"}
    assert not any("singer_" in name for name, _ in plain.named_parameters())
    after = singer_hf.resolve_vit(plain).block_outputs(images)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_merging_changes_no_weight_and_keeps_peft_bookkeeping(images):
    """A side branch has nothing to add to the teacher's weights: merge_adapter records the merge
    (for the named adapters only), the forward pass and every weight stay as they were."""
    model = peft.get_peft_model(make_vit().eval(), SingerConfig(layers=[2, 5], rank=4))
    model.add_adapter("other", SingerConfig(layers=[2, 5], rank=2, adapter_seed=1))
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    before = singer_hf.resolve_vit(model).block_outputs(images)
    model.merge_adapter(adapter_names=["other"], safe_merge=True)
    layer = model.base_model.singer_layers[2]
    assert layer.merged and layer.merged_adapters == ["other"]
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    after = singer_hf.resolve_vit(model).block_outputs(images)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    model.unmerge_adapter()
    assert not layer.merged
    with pytest.raises(ValueError, match=r"adapter_names: 'missing' is not an adapter of this layer"):
        model.merge_adapter(adapter_names=["missing"])


def test_named_adapters_disable_and_switch(images):
    """Two adapters on one teacher: refine picks one by name or the active one; disable_adapter turns refinement off."""
    model = peft.get_peft_model(make_vit().eval(), SingerConfig(layers=[2, 5], rank=4))
    model.add_adapter("other", SingerConfig(layers=[2, 5], rank=2, adapter_seed=1, adapter_init="random"))
    layer = model.base_model.singer_layers[5]
    feature = singer_hf.resolve_vit(model).block_outputs(images)[5]
    by_name = {name: layer.refine(feature, adapter_names=[name]) for name in ("default", "other")}
    assert not torch.allclose(by_name["default"], by_name["other"])
    assert torch.equal(layer.refine(feature), by_name["default"])  # "default" is active
    model.set_adapter("other")
    assert torch.equal(layer.refine(feature), by_name["other"])
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".other" in name for name in trainable)
    with model.disable_adapter():
        assert torch.equal(layer.refine(feature), feature)
    assert torch.equal(layer.refine(feature), by_name["other"])
    with pytest.raises(ValueError, match=r"adapter_names: \['nope'\] are not adapters of this layer"):
        layer.refine(feature, adapter_names=["nope"])


def test_teacher_on_the_meta_device_is_one_clear_error():
    with torch.device("meta"):
        teacher = make_vit()
    with pytest.raises(ValueError, match=r"^teacher: its weights are on the meta device") as error:
        peft.get_peft_model(teacher, SingerConfig(layers=[2, 5], rank=4))
    assert "\n" not in str(error.value)


def test_add_and_delete_adapters():
    model = peft.get_peft_model(make_vit(), SingerConfig(layers=[2, 5], rank=4))
    model.add_adapter("other", SingerConfig(layers=[2, 5], rank=2, adapter_seed=1))
    layer = model.base_model.singer_layers[2]
    assert set(layer.singer_down) == {"default", "other"} and layer.nullspace_row_count.keys() == {"default", "other"}
    model.delete_adapter("other")
    assert set(layer.singer_down) == set(layer.singer_up) == set(layer.nullspace_row_count) == {"default"}
    assert "other" not in model.peft_config and layer.num_prefix_tokens == 1


@pytest.mark.parametrize("target_modules", [["q_proj"], r"(.*\.)?layers\.(2|3)", r".*layers\.\d+"])
def test_target_modules_that_disagree_with_layers_fail_in_one_line(target_modules):
    with pytest.raises(ValueError, match=r"^target_modules: .* not the teacher blocks \[2, 5\]") as error:
        peft.get_peft_model(make_vit(), SingerConfig(layers=[2, 5], rank=4, target_modules=target_modules))
    assert "\n" not in str(error.value)


def test_clip_model_gets_adapters_on_its_vision_tower_only():
    import transformers

    vision = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=dict(vision, num_hidden_layers=4), vision_config=vision))
    model = peft.get_peft_model(clip, SingerConfig(layers=[1, 3], rank=4))
    wrapped = sorted(name for name, module in model.named_modules() if isinstance(module, SingerLayer))
    assert wrapped == ["base_model.model.vision_model.encoder.layers.1", "base_model.model.vision_model.encoder.layers.3"]


@pytest.mark.parametrize("family", sorted(NEWER_TEACHER_FACTORIES))
def test_gated_mlps_take_the_value_path_and_the_relative_threshold(family):
    """The basis: the first r directions, in descending σ, of M = (W_down W_up)ᵀ below τ·σ_max for a
    gated MLP, of M = (W_fc2 W_fc1)ᵀ below τ for a plain one (the paper's rule)."""
    torch.manual_seed(0)
    teacher = NEWER_TEACHER_FACTORIES[family]()
    mlp = singer_hf.resolve_vit(teacher).mlp(4)
    assert mlp.gated == (family in ("dinov3_vit_gated", "radio_swiglu", "aimv2_vision_model"))
    u, sigma, _ = torch.linalg.svd((mlp.down.detach().double() @ mlp.up.detach().double()).T)
    kept = (sigma < 0.05 * (sigma[0] if mlp.gated else 1)).nonzero().flatten()
    model = peft.get_peft_model(teacher, SingerConfig(layers=[3, 5], rank=4))
    layer = model.base_model.singer_layers[3]
    found = min(4, len(kept))
    assert found > 0 and layer.nullspace_row_count["default"] == found
    basis = layer.singer_up["default"].detach().double()
    assert torch.allclose(basis[:found].abs(), u[:, kept[:found]].T.abs(), atol=1e-5)


def test_relative_threshold_is_scale_free():
    torch.manual_seed(0)
    matrix = torch.randn(16, 40, dtype=torch.float64)  # D×K, K > D: e.g. stacked input projections
    absolute = singer_hf.nullspace_directions(matrix, 0.5)
    assert [len(singer_hf.nullspace_directions(matrix * scale, 0.1, relative=True)) for scale in (1e-3, 1, 1e3)] == [
        len(singer_hf.nullspace_directions(matrix, 0.1, relative=True))
    ] * 3
    assert len(singer_hf.nullspace_directions(matrix * 1e-3, 0.5)) == 16 != len(absolute)
    wide = torch.randn(16, 4, dtype=torch.float64)  # K < D: 12 directions beyond its rank have σ = 0
    assert len(singer_hf.nullspace_directions(wide, 1e-9)) == 12
