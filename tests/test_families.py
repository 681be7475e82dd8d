"""Each family of the architecture table through scripts/distill.py, loaded the way a user's Hub
checkpoint of it loads (tiny stand-ins, tests/standins.py), and the families the table refuses."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from safetensors.torch import load_file
from conftest import NEWER_TEACHER_FACTORIES, make_vit
from standins import hf_families, newer_families, save_timm, write_images

STUDENT = "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64"
TIMM = {
    "timm_vit": dict(architecture="vit_tiny_patch16_224", depth=6),
    # No CLS token: four registers, then the patches (global-average-pooled models).
    "timm_reg4_gap": dict(architecture="vit_base_patch16_reg4_gap_256", depth=6),
}
NEWER = newer_families()
# The paper's families with SiNGER; the newer ones with SiNGER and FitNet.
RUNS = [(family, "singer") for family in [*hf_families(), *TIMM]] + [(f, m) for f in NEWER for m in ("singer", "fitnet")]
# Families whose student is saved with another processor than the teacher's, checked in a process
# without singer_hf to give the pixels and features the student was trained on: a processor that does
# not normalise (the model does), a NaFlex one (patch sequences of any aspect ratio).
CHECK_SAVED_PROCESSOR = {"radio", "siglip2"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "train.parquet", count=16)


def _write_teacher(family: str, folder):
    if family in TIMM:
        save_timm(folder, **TIMM[family])
    else:
        {**hf_families(), **NEWER}[family](folder)
    return folder


@pytest.mark.parametrize("family, method", RUNS, ids=[f"{family}-{method}" for family, method in RUNS])
def test_family_distils_through_the_script(distill, images, tmp_path, family, method):
    teacher = _write_teacher(family, tmp_path / "teacher")
    output = tmp_path / "run"
    # One family also evaluates on a held-out split, as `--eval_split` users do.
    evaluation = ["--eval_split", "train", "--max_eval_samples", "8", "--eval_strategy", "steps", "--eval_steps", "1"]
    result = distill.main([
        "--teacher_name_or_path", str(teacher), "--student_size", "tiny", "--student_config_overrides", STUDENT,
        "--dataset_name", str(images), "--output_dir", str(output), "--max_steps", "2", "--method", method,
        "--per_device_train_batch_size", "4", "--rank", "4", "--report_to", "none", "--save_strategy", "no",
        "--logging_steps", "1", *(evaluation if family == "vit" else []),
    ])  # fmt: skip
    terms = {"loss_kd", "loss_outlier", "loss_info"} if method == "singer" else {"loss_kd"}
    assert terms <= set(result["losses"])
    if family == "vit":
        evaluated = [entry for entry in json.loads((output / "trainer_state.json").read_text())["log_history"] if "eval_loss" in entry]
        assert len(evaluated) == 2 and all({"eval_loss_kd", "eval_loss_outlier", "eval_loss_info"} <= set(e) for e in evaluated)
    assert all(torch.isfinite(torch.tensor(value)) for value in result["losses"].values())

    # The student is built at the size the teacher's processor gives (DINOv2: its crop, not its
    # config's 64; SigLIP2 NaFlex: its max_num_patches as a square), and the card's usage works with
    # the processor saved beside it.
    processor = transformers.AutoImageProcessor.from_pretrained(output)
    student = transformers.AutoModel.from_pretrained(output)
    teacher_processor = transformers.AutoImageProcessor.from_pretrained(teacher)
    size = distill.image_processor_stats(teacher_processor)[2]
    assert student.config.image_size == size == 32
    inputs = processor(images=PIL.Image.new("RGB", (45, 37), (10, 200, 90)), return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) == (size, size)
    layers = json.loads((output / "distillation" / "distillation_config.json").read_text())["student_layers"]
    with torch.no_grad():
        feature = student(**inputs, output_hidden_states=True).hidden_states[layers[-1] + 1]
    assert feature.shape == (1, 1 + (size // 8) ** 2, 32)
    if family in CHECK_SAVED_PROCESSOR and method == "singer":
        _check_saved_student_reproduces_training(teacher, output, layers[-1], tmp_path)
    if family in NEWER and method == "singer":  # the diagnostics read the run's teacher, adapters and student
        report = _diagnose().main(["--model_name_or_path", str(teacher), "--run_dir", str(output), "--dataset_name", str(images),
                                   "--output_dir", str(tmp_path / "diagnose"), "--num_images", "4", "--figure_images", "1"])  # fmt: skip
        teacher_layers = json.loads((output / "distillation" / "distillation_config.json").read_text())["teacher_layers"]
        assert {f"refined teacher block {layer}" for layer in teacher_layers} <= set(report["views"])
        assert all(view["num_images"] == 4 and view["patch_tokens_per_image"] == 16 for view in report["views"].values())


def _diagnose():
    from singer_hf.commands import diagnose

    return diagnose


SAVED_STUDENT_PROBE = """
import sys
import numpy as np, PIL.Image, torch
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel
run, image, layer, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
inputs = AutoImageProcessor.from_pretrained(run)(images=PIL.Image.open(image), return_tensors="pt")
with torch.no_grad():
    hidden = AutoModel.from_pretrained(run)(**inputs, output_hidden_states=True).hidden_states[layer + 1]
assert not any(name.startswith("singer_hf") for name in sys.modules)
save_file({"pixel_values": inputs["pixel_values"].contiguous(), "feature": hidden.contiguous()}, out)
"""


def _check_saved_student_reproduces_training(teacher, output, layer, tmp_path):
    """The pixels FeatureDistillationTrainer fed the run (uint8 at the processor's size, normalised with its
    statistics) are what the teacher's own forward reads, and what the saved student's processor
    gives in a process that knows nothing of this package; so are the student's features."""
    from singer_hf import resolve_vit
    from singer_hf.architectures import load_backbone
    from singer_hf.data import PixelNormalizer, image_processor_stats

    saved = transformers.AutoImageProcessor.from_pretrained(output)
    mean, std, size = image_processor_stats(saved)
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    PIL.Image.fromarray(rgb).save(tmp_path / "probe.png")
    trained_on = PixelNormalizer(mean, std)(torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous())

    teacher_model = load_backbone(str(teacher)).eval()
    teacher_inputs = transformers.AutoImageProcessor.from_pretrained(teacher)(images=PIL.Image.fromarray(rgb), return_tensors="pt")
    with torch.no_grad():
        own = teacher_model(**teacher_inputs, output_hidden_states=True).hidden_states[-1]
        ours = resolve_vit(teacher_model).block_outputs(trained_on)[-1]
    torch.testing.assert_close(ours, own, rtol=1e-4, atol=1e-4)

    result = tmp_path / "probe.safetensors"
    probe = [sys.executable, "-c", SAVED_STUDENT_PROBE, str(output), str(tmp_path / "probe.png"), str(layer), str(result)]
    subprocess.run(probe, check=True, capture_output=True, timeout=300)
    loaded = load_file(result)
    torch.testing.assert_close(loaded["pixel_values"], trained_on, rtol=0, atol=1e-5)
    student = transformers.AutoModel.from_pretrained(output).eval()
    with torch.no_grad():
        feature = student(pixel_values=trained_on, output_hidden_states=True).hidden_states[layer + 1]
    torch.testing.assert_close(loaded["feature"], feature, rtol=1e-4, atol=1e-4)


def _tiny_timm(architecture, **model_args):
    config = transformers.TimmWrapperConfig(
        architecture=architecture, model_args=dict(img_size=28, patch_size=7, embed_dim=32, num_heads=2, depth=3, **model_args)
    )
    return transformers.TimmWrapperModel(config)


def _student(image=28, patch=7):
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                                    image_size=image, patch_size=patch)  # fmt: skip
    return transformers.ViTModel(config)


def test_dinov2_giant_swiglu_blocks_take_the_gated_rule():
    """DINOv2-giant's SwiGLU (separate gate/up/down projections): the value path, σ < τ·σ_max."""
    from singer_hf import DistillationModelConfig, DistillationModel, resolve_vit

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=7,
                                       use_swiglu_ffn=True)  # fmt: skip
    teacher = transformers.Dinov2Model(config)
    assert resolve_vit(teacher).mlp(2).gated
    model = DistillationModel(teacher, _student(), DistillationModelConfig(teacher_layers=[1, 2], rank=4))
    assert all(0 < layer.nullspace_row_count["default"] for layer in model.adapters.values())
    model(pixel_values=torch.randn(2, 3, 28, 28)).loss.backward()


@pytest.mark.parametrize(
    "teacher, message",
    [
        (lambda: _tiny_timm("vit_giant_patch14_dinov2"), "teacher: block 2 of this timm_wrapper model has a GluMlp MLP"),
        (lambda: _tiny_timm("vit_small_patch16_18x2_224"), "teacher: block 2 of this timm_wrapper model has a ParallelThingsBlock MLP"),
    ],
    ids=["timm_dinov2_giant_packed_swiglu", "timm_parallel_blocks"],
)
def test_blocks_without_a_readable_mlp_fail_at_construction_for_singer_only(teacher, message):
    from singer_hf import DistillationModelConfig, DistillationModel

    with pytest.raises(ValueError, match=message) as error:
        DistillationModel(teacher(), _student(), DistillationModelConfig(teacher_layers=[1, 2], rank=4))
    assert "\n" not in str(error.value) and "fitnet" in str(error.value)
    model = DistillationModel(teacher(), _student(), DistillationModelConfig(method="fitnet", teacher_layers=[1, 2]))
    assert torch.isfinite(model(pixel_values=torch.randn(2, 3, 28, 28)).loss)


def test_non_vit_timm_models_fail_at_construction():
    from singer_hf import DistillationModelConfig, DistillationModel

    with pytest.raises(ValueError, match=r"^teacher: timm Eva \(eva02_tiny_patch14_224\) is not supported") as error:
        DistillationModel(_tiny_timm("eva02_tiny_patch14_224"), _student(), DistillationModelConfig(method="fitnet"))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("family", sorted(NEWER_TEACHER_FACTORIES))
def test_the_table_reads_newer_families_as_their_own_forward_does(family):
    """Block outputs through the table equal the model's own hidden states: DINOv3's RoPE reaches every
    block, SigLIP2 gets its patchified input, C-RADIO (normalising inside) gets pixels normalised with
    its own statistics where its forward gets [0, 1] pixels."""
    from singer_hf import resolve_vit

    torch.manual_seed(0)
    model = NEWER_TEACHER_FACTORIES[family]().eval()
    vit = resolve_vit(model)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inputs = {"pixel_values": pixels}
    if family.startswith("siglip2"):
        processor = transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16, do_resize=False, do_rescale=False, do_normalize=False)
        inputs = processor(images=list(pixels), return_tensors="pt")
    if vit.input_normalization is not None:
        mean, std = (torch.tensor(values)[:, None, None] for values in vit.input_normalization)
        pixels = (pixels - mean) / std
    with torch.no_grad():
        expected = model(**inputs, output_hidden_states=True).hidden_states[1:]
        outputs = vit.block_outputs(pixels)
    assert len(outputs) == vit.depth == 6
    for ours, theirs in zip(outputs, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: (transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1])), _student()),
         r"^teacher: unsupported model type 'dinov3_convnext' .*; supported: .*dinov3_vit"),
        (lambda: (transformers.RadioModel(transformers.RadioConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                                   image_size=28, patch_size=7, max_img_size=56,
                                                                   video_temporal_patch_size=2)), _student()),
         r"^teacher: radio models with a video patch embedder are not supported"),
        (lambda: (NEWER_TEACHER_FACTORIES["aimv2_vision_model"](), _student(image=64, patch=8)),
         r"^teacher: this aimv2_vision_model model has a fixed 32px position-embedding table and cannot read 64px images"),
        (lambda: (make_vit(), NEWER_TEACHER_FACTORIES["radio"]()),
         r"^student: radio models normalise their pixels inside their forward and can only be teachers"),
    ],
    ids=["dinov3_convnext", "radio_video", "aimv2_fixed_size", "radio_student"],
)  # fmt: skip
def test_what_the_table_cannot_run_is_refused_in_one_line(build, message):
    from singer_hf import DistillationModelConfig, DistillationModel

    teacher, student = build()
    with pytest.raises(ValueError, match=message) as error:
        DistillationModel(teacher, student, DistillationModelConfig(method="fitnet", teacher_layers=[1, 2]))
    assert "\n" not in str(error.value)
