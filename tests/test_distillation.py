"""DistillationModel: nullspace property, gradients, layer mapping, architectures, bad input."""

import peft
import pytest
import torch
import transformers
from conftest import IMAGE, NEWER_TEACHER_FACTORIES, PATCH, TEACHER_FACTORIES, make_vit, tiny_config

from singer_hf import DistillationModelConfig, DistillationModel, SingerConfig, map_layers


def _teacher_with_known_nullspace(null_dims=8, width=32, seed=0):
    """Block 2's MLP ignores an 8-dim, zero-mean subspace Q: W_fc1 ← W_fc1 (I − QQᵀ).

    Block 2's attention output is zeroed and its pre-MLP LayerNorm made (nearly) linear with a large
    eps, so the block computes its MLP branch on a rescaled input: the setting in which the adapter's
    linearisation x ↦ x·M is exact up to the activation.
    """
    teacher = make_vit(width, 4, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    centered = torch.randn(width, null_dims, generator=generator)
    centered -= centered.mean(0, keepdim=True)  # orthogonal to the all-ones vector LayerNorm removes
    q, _ = torch.linalg.qr(centered)
    block = teacher.layers[2]
    with torch.no_grad():
        block.mlp.fc1.weight.copy_(block.mlp.fc1.weight @ (torch.eye(width) - q @ q.T))
        block.attention.o_proj.weight.zero_()
        block.attention.o_proj.bias.zero_()
    block.layernorm_after.eps = 1e6
    return teacher


def _block_update_change(block, feature, delta):
    """How much the block's computed update (output − input) moves when its input moves by `delta`."""
    update = lambda x: block(x) - x  # noqa: E731
    return (update(feature + delta) - update(feature)).norm()


def test_nullspace_init_barely_changes_the_next_block(images):
    deltas = {}
    for init in ("nullspace", "random"):
        teacher = _teacher_with_known_nullspace()
        model = peft.get_peft_model(teacher, SingerConfig(layers=[1, 3], rank=8, null_threshold=1e-3, adapter_init=init))
        layer = model.base_model.singer_layers[1]
        assert layer.nullspace_row_count["default"] == (8 if init == "nullspace" else 0)
        with torch.no_grad():
            feature = teacher.layers[1](teacher.layers[0](teacher.embeddings(images)))
            deltas[init] = layer.refine(feature) - feature
    feature, block = feature.detach(), teacher.layers[2]
    # The random perturbation rescaled to the nullspace one's per-token norms.
    null_delta = deltas["nullspace"]
    random_delta = deltas["random"] * null_delta.norm(dim=-1, keepdim=True) / deltas["random"].norm(dim=-1, keepdim=True).clamp(min=1e-12)
    random_delta[:, 0] = 0
    with torch.no_grad():
        ratio = _block_update_change(block, feature, null_delta) / _block_update_change(block, feature, random_delta)
    print(f"nullspace-vs-random change of block l+1's update, same perturbation norm: {ratio.item():.4f}")
    assert null_delta[:, 1:].norm() > 0.1 * feature[:, 1:].norm()  # a real perturbation, not a no-op
    assert ratio < 0.1


def test_gradients_reach_student_projectors_and_adapters_only(images):
    model = DistillationModel(make_vit(), make_vit(32, 4, seed=1), DistillationModelConfig(teacher_layers=[2, 5], rank=8)).train()
    model(pixel_values=images).loss.backward()
    for name, param in model.named_parameters():
        if name.startswith("teachers.") and "singer_" not in name:
            assert not param.requires_grad and param.grad is None, name
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = {"students.": 0, "projectors.": 0, "singer_": 0}
    for name, param in trainable.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        for key in groups:
            groups[key] += key in name and param.grad is not None and param.grad.abs().sum().item() > 0
    assert all(count > 0 for count in groups.values()), groups
    assert not model.teacher.training and model.student.training


def test_hungarian_mapping_matches_the_official_assignment():
    assert map_layers([17, 23], 24, 12) == [8, 11]
    assert map_layers([11, 17, 23], 24, 12) == [5, 8, 11]
    assert map_layers([5, 11], 12, 12) == [5, 10]  # the official quirk, kept
    assert DistillationModelConfig().layers_for(24) == [17, 23]
    assert DistillationModelConfig(method="fitnet").layers_for(24) == [11, 17, 23]
    assert DistillationModelConfig().layers_for(1) == [0]


@pytest.mark.parametrize("family", sorted(TEACHER_FACTORIES))
@pytest.mark.parametrize("method", ["singer", "fitnet", "vitkd"])
def test_every_family_trains_with_every_method(family, method, images):
    model = DistillationModel(
        TEACHER_FACTORIES[family](), make_vit(32, 4, seed=1), DistillationModelConfig(method=method, rank=4, null_threshold=1.0)
    )
    output = model(pixel_values=images)
    assert torch.isfinite(output.loss) and output.loss > 0
    output.loss.backward()
    assert all(p.grad is not None for p in model.student.layers.parameters())  # every block is distilled


STUDENT_FACTORIES = {
    "vit_with_pooler": lambda: transformers.ViTModel(tiny_config(transformers.ViTConfig, 32, 6)),
    **{family: TEACHER_FACTORIES[family] for family in ("dinov2", "clip_vision_model", "timm_wrapper")},
}


@pytest.mark.parametrize("family", sorted(STUDENT_FACTORIES))
@pytest.mark.parametrize("method", ["singer", "fitnet", "vitkd"])
def test_every_trainable_parameter_gets_a_gradient(family, method, images, tmp_path):
    """What DDP without find_unused_parameters needs: one backward reaches every trainable parameter.
    The 6-block teacher maps onto student blocks up to 4 of 6, so block 5 and the final norm are unreached."""
    student = STUDENT_FACTORIES[family]()
    initial = {name: value.clone() for name, value in student.state_dict().items()}
    model = DistillationModel(make_vit(), student, DistillationModelConfig(method=method, rank=4)).train()
    assert max(model.student_layers) == 4
    model(pixel_values=images).loss.backward()
    missing = [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]
    assert not missing, missing
    frozen = set(model.frozen_student_parameters)
    assert frozen == {name for name, param in student.named_parameters() if not param.requires_grad}
    assert any(".5." in name for name in frozen) and any("norm" in name and ".5." not in name for name in frozen), frozen
    if family == "vit_with_pooler":
        assert {"pooler.dense.weight", "pooler.dense.bias"} <= frozen
    if family == "dinov2":
        assert "embeddings.mask_token" in frozen
    # The frozen parameters keep their values and are saved: the student loads whole, all of it trainable.
    assert all(torch.equal(student.state_dict()[name], initial[name]) for name in frozen)
    student.save_pretrained(tmp_path)
    reloaded, info = type(student).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(param.requires_grad for param in reloaded.parameters())


@pytest.mark.parametrize("family", ["deit", "clip_vision_model", "timm_wrapper"])
def test_other_families_work_as_students(family, images):
    student = TEACHER_FACTORIES[family]()
    model = DistillationModel(make_vit(), student, DistillationModelConfig(rank=4))
    model(pixel_values=images).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize("family", sorted(NEWER_TEACHER_FACTORIES))
def test_newer_families_as_vitkd_teachers_and_as_students(family, images):
    torch.manual_seed(0)
    vitkd = DistillationModel(NEWER_TEACHER_FACTORIES[family](), make_vit(32, 4, seed=1), DistillationModelConfig(method="vitkd"))
    vitkd(pixel_values=images).loss.backward()
    assert vitkd.method.generator[0].weight.grad.abs().sum() > 0
    if family.startswith("radio"):
        return  # normalises its input inside: a teacher only (tests/test_families.py)
    student = NEWER_TEACHER_FACTORIES[family]()
    model = DistillationModel(make_vit(), student, DistillationModelConfig(rank=4))
    model(pixel_values=images).loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def _model(**overrides):
    teacher = overrides.pop("teacher", None) or make_vit()
    student = overrides.pop("student", None) or make_vit(32, 4, seed=1)
    return DistillationModel(teacher, student, DistillationModelConfig(**overrides))


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: _model(student=transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=36, patch_size=8))), "student: image size 36 is not a multiple of its patch size 8"),
        (lambda: _model(student=transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=36, patch_size=6))), "teacher: image size 36 is not a multiple of its patch size 8"),
        (lambda: _model(teacher_layers=[2, 6]), "teacher_layers: block 6 is out of range"),
        (lambda: _model(teacher_layers=[-1, 5], method="fitnet"), "teacher_layers: block indices must be >= 0"),
        (lambda: _model(teacher_layers=[2, 2, 5]), "teacher_layers: duplicate"),
        (lambda: _model(rank=49), "rank: must be in \\[1, 48\\]"),
        (lambda: _model(rank=0), "rank: must be >= 1"),
        (lambda: _model(null_threshold=-0.1), "null_threshold: must be >= 0"),
        (lambda: _model(outlier_quantile=1.0), "outlier_quantile: must be in \\(0, 1\\)"),
        (lambda: _model(outlier_quantile=0.0), "outlier_quantile"),
        (lambda: _model(method="crd"), "method: must be one of"),
        (lambda: _model(teacher=transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))), "teacher: unsupported model type 'bert'.*supported: aimv2, aimv2_vision_model, clip, clip_vision_model, deit, dinov2"),
        (lambda: _model(student=torch.nn.Linear(3, 3)), "student: unsupported model type None"),
        (lambda: _model(teacher_layers=[0, 1, 2, 3, 4]), "teacher_layers: 5 teacher layers cannot map one-to-one onto a 4-block student"),
        (lambda: SingerConfig(layers=[3, 3]), "layers: duplicate"),
        (lambda: SingerConfig(layers=[]), "layers: give at least one"),
        (lambda: SingerConfig(layers=[1], adapter_init="zeros"), "adapter_init: must be one of"),
        (lambda: peft.get_peft_model(make_vit(), SingerConfig(layers=[1, 9])), "layers: block 9 is out of range for a 6-block vit model"),
    ],
)
def test_bad_configuration_raises_one_clear_error(build, argument):
    with pytest.raises(ValueError, match=argument) as error:
        build()
    assert "\n" not in str(error.value)


def test_single_distilled_layer_is_legal(images):
    model = _model(teacher_layers=[5], rank=8)
    assert model.student_layers == [3]
    assert torch.isfinite(model(pixel_values=images).losses["info"])


@pytest.mark.parametrize(
    "pixel_values",
    [torch.randn(3, IMAGE, IMAGE), torch.randn(2, 1, IMAGE, IMAGE), torch.randn(2, 3, IMAGE + 8, IMAGE), [[0.0]]],
)
def test_bad_pixel_values_raise(pixel_values):
    model = _model(rank=4)
    with pytest.raises(ValueError, match=f"pixel_values: expected B×3×{IMAGE}×{IMAGE} images, got"):
        model(pixel_values=pixel_values)


@pytest.mark.parametrize("teacher_family", ["siglip_no_cls", "timm_registers_no_cls", "deit_cls_and_distillation"])
def test_kd_compares_matching_tokens_only(teacher_family, images):
    """Different prefix tokens: KD compares the patches, and CLS with CLS only when both have one."""
    import torch.nn.functional as F

    vision = dict(hidden_size=48, num_hidden_layers=6, num_attention_heads=2, intermediate_size=96, image_size=IMAGE, patch_size=PATCH)
    teacher, teacher_prefix, has_cls = {
        "siglip_no_cls": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision)), 0, False),
        "timm_registers_no_cls": (lambda: transformers.TimmWrapperModel(transformers.TimmWrapperConfig(
            architecture="vit_base_patch16_reg4_gap_256",
            model_args=dict(img_size=IMAGE, patch_size=PATCH, embed_dim=48, depth=6, num_heads=2))), 4, False),
        "deit_cls_and_distillation": (lambda: TEACHER_FACTORIES["deit"](), 2, True),
    }[teacher_family]
    model = DistillationModel(teacher(), make_vit(32, 4, seed=1), DistillationModelConfig(method="fitnet", teacher_layers=[5]))
    teacher_feature = torch.randn(2, teacher_prefix + 16, 48)
    student_feature = torch.randn(2, 1 + 16, 32)
    kept = slice(0, None) if has_cls else slice(1, None)  # the student's CLS only when the teacher has one
    teacher_tokens = torch.cat([teacher_feature[:, :1], teacher_feature[:, teacher_prefix:]], 1) if has_cls else teacher_feature[:, teacher_prefix:]
    expected = F.mse_loss(model.method.projectors[0](student_feature[:, kept]), teacher_tokens)
    torch.testing.assert_close(model.method.kd(model.method.projectors[0], student_feature, teacher_feature), expected)


def test_teacher_built_for_another_size_reads_the_students_images():
    """A DINOv2 teacher whose config says 2× the student's size interpolates its position embeddings."""
    config = tiny_config(transformers.Dinov2Config, 48, 6)
    config.image_size = 2 * IMAGE
    teacher = transformers.Dinov2Model(config)
    model = DistillationModel(teacher, make_vit(32, 4, seed=1), DistillationModelConfig(rank=4))
    assert model.image_size == IMAGE
    output = model(pixel_values=torch.randn(2, 3, IMAGE, IMAGE))
    assert torch.isfinite(output.loss)
    with pytest.raises(ValueError, match=r"pixel_values: expected B×3×32×32 images, got \(2, 3, 64, 64\)"):
        model(pixel_values=torch.randn(2, 3, 2 * IMAGE, 2 * IMAGE))


def test_unnormalised_uint8_pixels_raise():
    with pytest.raises(ValueError, match="pixel_values: expected normalised float images, got torch.uint8"):
        _model(rank=4)(pixel_values=torch.zeros(2, 3, IMAGE, IMAGE, dtype=torch.uint8))


def test_tracing_the_student_leaves_its_mode_and_the_random_state_alone():
    """The projectors, initialised after the trace, come out the same with and without student dropout."""
    projectors = {}
    for dropout in (0.0, 0.5):
        torch.manual_seed(0)
        student = transformers.ViTModel(tiny_config(transformers.ViTConfig, 32, 4, hidden_dropout_prob=dropout))
        model = DistillationModel(make_vit(), student, DistillationModelConfig(rank=4))
        assert student.training
        projectors[dropout] = model.method.projectors.state_dict()
    assert all(torch.equal(value, projectors[0.5][key]) for key, value in projectors[0.0].items())
