"""The losses equal the method's formulas (docs/method.md), computed here independently of the package."""

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import make_vit

from singer_hf import DistillationModelConfig, DistillationModel, SingerConfig
from singer_hf.losses import outlier_loss


def _perturb_adapters(model):
    with torch.no_grad():
        for layer in model.adapters.values():
            layer.singer_up["default"].mul_(3.0).add_(0.1 * torch.randn_like(layer.singer_up["default"]))


def _spec_outlier(refined_patches, q):
    terms = []
    for norms in refined_patches.norm(dim=-1):
        threshold = np.quantile(norms.detach().numpy(), q)  # numpy's default is linear interpolation
        terms += [(n - threshold) ** 2 for n in norms if n > threshold]
    return torch.stack(terms).mean() if terms else torch.tensor(0.0)


def _spec_gram(a, b):
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return ((torch.einsum("bpd,bqd->bpq", a, a) - torch.einsum("bpd,bqd->bpq", b, b)) ** 2).mean()


def _refine(layer, feature):
    x = feature[:, 1:]
    return torch.cat([feature[:, :1], x + x @ layer.singer_down["default"] @ layer.singer_up["default"]], 1)


@pytest.mark.parametrize("layers", [[2, 5], [1, 3, 5], [5]])
def test_singer_losses_match_the_spec(layers, images):
    torch.manual_seed(0)
    model = DistillationModel(make_vit(48, 6, seed=0), make_vit(32, 4, seed=1), DistillationModelConfig(teacher_layers=layers, rank=8))
    _perturb_adapters(model)
    output = model(pixel_values=images)

    teacher, student = model.teacher.get_base_model(), model.student
    teacher_hidden = teacher(pixel_values=images, output_hidden_states=True).hidden_states
    student_hidden = student(pixel_values=images, output_hidden_states=True).hidden_states
    kd, outlier, info, previous = [], [], [], None
    for index, (layer, student_layer) in enumerate(zip(layers, model.student_layers)):
        feature = teacher_hidden[layer + 1]
        refined = _refine(model.adapters[layer], feature)
        kd.append(((model.method.projectors[index](student_hidden[student_layer + 1]) - refined) ** 2).mean())
        outlier.append(_spec_outlier(refined[:, 1:], 0.97))
        if layer == layers[-1]:
            reference = previous if previous is not None else feature
            info.append(_spec_gram(refined[:, 1:], reference[:, 1:]))
        else:
            next_block = teacher.layers[layer + 1]
            info.append(((next_block(refined) - teacher_hidden[layer + 2]) ** 2).mean())
            previous = refined
    expected = {name: torch.stack(values).mean() for name, values in (("kd", kd), ("outlier", outlier), ("info", info))}
    for name, value in expected.items():
        torch.testing.assert_close(output.losses[name], value, rtol=1e-4, atol=1e-7)
    assert expected["outlier"] > 0
    torch.testing.assert_close(output.loss, expected["kd"] + 0.01 * expected["outlier"] + expected["info"], rtol=1e-4, atol=1e-7)


def test_outlier_loss_uses_a_strict_per_image_quantile():
    # Image 0: norms 1,1,1,1,5 → t = 1 (q = 0.5); only the 5 is above it: (5 − 1)² over one token.
    # Image 1: all norms equal → no outlier. Pooled mean over S = 16.
    patches = torch.zeros(2, 5, 3)
    patches[0, :, 0] = torch.tensor([1.0, 1, 1, 1, 5])
    patches[1, :, 1] = 2.0
    torch.testing.assert_close(outlier_loss(patches, 0.5), torch.tensor(16.0))
    assert outlier_loss(patches[1:], 0.5).item() == 0.0
    # t is interpolated linearly: norms 0..4, q = 0.9 → t = 3.6; (4 − 3.6)² = 0.16.
    ramp = torch.zeros(1, 5, 2)
    ramp[0, :, 0] = torch.arange(5.0)
    torch.testing.assert_close(outlier_loss(ramp, 0.9), torch.tensor(0.16))


def test_ablations_and_loss_weights(images):
    base = dict(teacher_layers=[2, 5], rank=8)
    no_info = DistillationModel(make_vit(), make_vit(32, 4, seed=1), DistillationModelConfig(info_weight=0.0, **base))
    output = no_info(pixel_values=images)
    torch.testing.assert_close(output.loss, output.losses["kd"] + 0.01 * output.losses["outlier"])
    random = DistillationModel(make_vit(), make_vit(32, 4, seed=1), DistillationModelConfig(adapter_init="random", **base))
    assert all(layer.nullspace_row_count["default"] == 0 for layer in random.adapters.values())
    assert random.teacher.peft_config["default"].adapter_init == "random"


def test_fitnet_is_lambda_times_the_sum_over_layers(images):
    model = DistillationModel(make_vit(), make_vit(32, 4, seed=1), DistillationModelConfig(method="fitnet"))
    assert model.teacher_layers == [2, 4, 5]
    output = model(pixel_values=images)
    teacher_hidden = model.teacher(pixel_values=images, output_hidden_states=True).hidden_states
    student_hidden = model.student(pixel_values=images, output_hidden_states=True).hidden_states
    expected = sum(
        ((model.method.projectors[i](student_hidden[s + 1]) - teacher_hidden[t + 1]) ** 2).mean()
        for i, (t, s) in enumerate(zip(model.teacher_layers, model.student_layers))
    )
    torch.testing.assert_close(output.losses["kd"], expected)
    torch.testing.assert_close(output.loss, 10.0 * expected)


def test_vitkd_generation_is_scored_on_masked_tokens_only(images):
    model = DistillationModel(make_vit(), make_vit(32, 4, seed=1), DistillationModelConfig(method="vitkd"))
    assert model.teacher_layers == [0, 1, 5] and model.student_layers == [0, 1, 3]
    state = model.method.mask_generator.get_state()
    output = model(pixel_values=images)
    model.method.mask_generator.set_state(state)
    masked = model.method.draw_mask(2, 16, images.device)
    assert 0 < masked.sum() < masked.numel()
    student_hidden = model.student(pixel_values=images, output_hidden_states=True).hidden_states
    teacher_hidden = model.teacher(pixel_values=images, output_hidden_states=True).hidden_states
    tokens = model.method.generation_projector(student_hidden[4][:, 1:])
    tokens = torch.where(masked[..., None], model.method.mask_token, tokens)
    generated = model.method.generator(tokens.transpose(1, 2).reshape(2, 48, 4, 4)).flatten(2).transpose(1, 2)
    errors = ((generated - teacher_hidden[6][:, 1:]) ** 2).mean(-1)
    torch.testing.assert_close(output.losses["generation"], errors[masked].mean())
    output.loss.backward()
    assert model.method.mask_token.grad is not None and model.method.generator[0].weight.grad.abs().sum() > 0


def test_prefix_tokens_align_by_cls_and_patches(images):
    from conftest import TEACHER_FACTORIES

    teacher = TEACHER_FACTORIES["dinov2_with_registers"]()
    model = DistillationModel(teacher, make_vit(32, 4, seed=1), DistillationModelConfig(teacher_layers=[5], rank=4))
    output = model(pixel_values=images)
    teacher_hidden = model.teacher.get_base_model()(pixel_values=images, output_hidden_states=True).hidden_states
    refined = model.adapters[5].refine(teacher_hidden[6])
    assert torch.equal(refined[:, :5], teacher_hidden[6][:, :5])  # CLS and registers untouched
    student = model.student(pixel_values=images, output_hidden_states=True).hidden_states[model.student_layers[0] + 1]
    target = torch.cat([refined[:, :1], refined[:, 5:]], 1)  # registers have no student counterpart
    torch.testing.assert_close(output.losses["kd"], ((model.method.projectors[0](student) - target) ** 2).mean())


def test_peft_teacher_can_be_passed_in(tmp_path, images):
    peft.get_peft_model(make_vit(), SingerConfig(layers=[4, 5], rank=4)).save_pretrained(tmp_path)
    teacher = peft.PeftModel.from_pretrained(make_vit(), tmp_path)  # loaded for inference: adapters frozen
    model = DistillationModel(teacher, make_vit(32, 4, seed=1), DistillationModelConfig(teacher_layers=[4, 5], rank=4))
    assert model.teacher is teacher and sorted(model.adapters) == [4, 5]
    trainable = [name for name, param in model.teacher.named_parameters() if param.requires_grad]
    assert len(trainable) == 4 and all("singer_" in name for name in trainable)
    with pytest.raises(ValueError, match="teacher_layers"):
        DistillationModel(teacher, make_vit(32, 4, seed=1), DistillationModelConfig(teacher_layers=[3, 5], rank=4))
    with pytest.raises(ValueError, match="rank: 8 differs from the teacher's SiNGER adapters of rank 4"):
        DistillationModel(teacher, make_vit(32, 4, seed=1), DistillationModelConfig(teacher_layers=[4, 5], rank=8))


def _dinov3(gated=False):
    torch.manual_seed(0)
    config = transformers.DINOv3ViTConfig(hidden_size=48, num_hidden_layers=6, num_attention_heads=2, intermediate_size=96,
                                          image_size=32, patch_size=8, num_register_tokens=4, use_gated_mlp=gated,
                                          layerscale_value=0.5)  # fmt: skip
    return transformers.DINOv3ViTModel(config)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_singer_losses_on_a_rope_teacher_match_the_spec(gated, images):
    """DINOv3: block l+1 of the information loss gets the forward's RoPE cos/sin, like the model's own
    blocks; the adapter leaves CLS and the 4 registers alone."""
    model = DistillationModel(_dinov3(gated), make_vit(32, 4, seed=1), DistillationModelConfig(teacher_layers=[2, 5], rank=8))
    _perturb_adapters(model)
    output = model(pixel_values=images)
    teacher = model.teacher.get_base_model()
    hidden = teacher(pixel_values=images, output_hidden_states=True).hidden_states
    rope = teacher.rope_embeddings(images)
    student_hidden = model.student(pixel_values=images, output_hidden_states=True).hidden_states
    layer = model.adapters[2]
    x = hidden[3][:, 5:]
    refined = torch.cat([hidden[3][:, :5], x + x @ layer.singer_down["default"] @ layer.singer_up["default"]], 1)
    following = teacher.model.layer[3](refined, position_embeddings=rope)
    expected_info = ((following - hidden[4]) ** 2).mean()
    final = model.adapters[5].refine(hidden[6])
    expected_info = (expected_info + _spec_gram(final[:, 5:], refined[:, 5:])) / 2
    torch.testing.assert_close(output.losses["info"], expected_info, rtol=1e-4, atol=1e-7)
    # The student (CLS, no registers) is compared with the teacher's CLS and patches.
    kd = [((model.method.projectors[i](student_hidden[s + 1]) - torch.cat([t[:, :1], t[:, 5:]], 1)) ** 2).mean()
          for i, (s, t) in enumerate(zip(model.student_layers, (refined, final)))]  # fmt: skip
    torch.testing.assert_close(output.losses["kd"], sum(kd) / 2, rtol=1e-4, atol=1e-7)
    output.loss.backward()
    assert all(layer.singer_up["default"].grad.abs().sum() > 0 for layer in model.adapters.values())


def test_several_summary_tokens_match_the_students_cls(images):
    """C-RADIO's 3 summary tokens and 7 registers: the student's CLS is compared with the first summary
    token, the patches with the patches; the refinement leaves all 10 prefix tokens alone."""
    torch.manual_seed(0)
    config = transformers.RadioConfig(hidden_size=48, num_hidden_layers=6, num_attention_heads=2, mlp_ratio=2.0,
                                      image_size=32, patch_size=8, max_img_size=64)  # fmt: skip
    model = DistillationModel(transformers.RadioModel(config), make_vit(32, 4, seed=1), DistillationModelConfig(method="fitnet", teacher_layers=[5]))
    output = model(pixel_values=images)
    teacher_hidden = model.method._teacher.block_outputs(images)[5]
    student = model.student(pixel_values=images, output_hidden_states=True).hidden_states[model.student_layers[0] + 1]
    target = torch.cat([teacher_hidden[:, :1], teacher_hidden[:, 10:]], 1)
    torch.testing.assert_close(output.losses["kd"], ((model.method.projectors[0](student) - target) ** 2).mean())


@pytest.mark.parametrize("student_patch", [4, 16], ids=["finer-student", "coarser-student"])
def test_kd_compares_the_students_patches_resampled_onto_the_teachers_grid(student_patch, images):
    """A /8 teacher (4×4 patches) and a /4 or /16 student (8×8 or 2×2): the student's patch map is
    resampled bilinearly onto the teacher's grid (antialiased when it shrinks); CLS to CLS. SiNGER's
    outlier loss stays on the teacher's 16 patches."""
    student = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                                           intermediate_size=64, image_size=32, patch_size=student_patch),
                                    add_pooling_layer=False)  # fmt: skip
    model = DistillationModel(make_vit(), student, DistillationModelConfig(method="fitnet", teacher_layers=[5]))
    output = model(pixel_values=images)
    teacher_hidden = model.teacher(pixel_values=images, output_hidden_states=True).hidden_states[6]
    student_hidden = model.student(pixel_values=images, output_hidden_states=True).hidden_states[model.student_layers[0] + 1]
    side = 32 // student_patch
    grid = student_hidden[:, 1:].transpose(1, 2).reshape(2, 32, side, side)
    resampled = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False, antialias=side > 4)
    tokens = torch.cat([student_hidden[:, :1], resampled.flatten(2).transpose(1, 2)], 1)
    expected = ((model.method.projectors[0](tokens) - teacher_hidden) ** 2).mean()
    torch.testing.assert_close(output.losses["kd"], expected, rtol=1e-4, atol=1e-7)

    singer = DistillationModel(make_vit(), student, DistillationModelConfig(teacher_layers=[2, 5], rank=4))
    _perturb_adapters(singer)
    losses = singer(pixel_values=images).losses
    teacher_hidden = singer.method._teacher.block_outputs(images)
    refined = [singer.adapters[layer].refine(teacher_hidden[layer])[:, 1:] for layer in (2, 5)]
    assert all(patches.shape[1] == 16 for patches in refined)
    torch.testing.assert_close(losses["outlier"], sum(outlier_loss(patches, 0.97) for patches in refined) / 2)
    vitkd = DistillationModel(make_vit(), student, DistillationModelConfig(method="vitkd"))
    vitkd(pixel_values=images).loss.backward()
    assert vitkd.method.generator[0].weight.grad.abs().sum() > 0
