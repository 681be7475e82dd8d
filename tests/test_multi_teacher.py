"""Several teachers: per-teacher target normalisation (PHI-S), per-teacher preprocessing, the heads
saved beside the student, and the statistics' way through the Trainer, its checkpoints and two
processes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import IMAGE, make_vit
from safetensors.torch import load_file
from torchvision.transforms import v2
from transformers import AutoModel, ViTImageProcessor

from singer_hf import DistillationModel, DistillationModelConfig, TeacherSettings, load_teacher_heads, resolve_vit
from singer_hf.data import PixelNormalizer, PixelValuesCollator, build_transforms
from singer_hf.layout import HEADS_FILE
from singer_hf.normalization import FeatureMoments
from singer_hf.trainer import FeatureDistillationArguments, FeatureDistillationTrainer

CONFIG = dict(teacher_layers=None, rank=4)
LAYERS = {"a": [2, 5], "b": [3, 5]}
STUDENT_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _pixels(count, seed):
    return torch.randn(count, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def _teachers():
    return {"a": make_vit(seed=0), "b": make_vit(64, 6, seed=3)}


def _model(normalization="phi-s", method="singer", teachers=None, **settings):
    teachers = teachers or _teachers()
    torch.manual_seed(7)
    config = DistillationModelConfig(method=method, **CONFIG) if method == "singer" else DistillationModelConfig(method=method)
    return DistillationModel(
        teachers,
        make_vit(32, 4, seed=1),
        config,
        {name: TeacherSettings(layers=LAYERS[name], normalization=normalization, **settings) for name in teachers},
    ).train()


def _gradients(model):
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def test_one_teacher_by_name_and_a_zero_weight_second_teacher_train_as_the_single_teacher_path(images):
    """Bit-exact: losses and every gradient of the single-teacher model."""
    config = DistillationModelConfig(teacher_layers=[2, 5], rank=4)
    torch.manual_seed(7)
    single = DistillationModel(make_vit(seed=0), make_vit(32, 4, seed=1), config).train()
    torch.manual_seed(7)
    named = DistillationModel(
        {"a": make_vit(seed=0)}, make_vit(32, 4, seed=1), config,
        {"a": TeacherSettings(normalization="none", image_mean=STUDENT_STATS[0], image_std=STUDENT_STATS[1])},
        image_statistics=STUDENT_STATS,
    ).train()  # fmt: skip
    torch.manual_seed(7)
    config = DistillationModelConfig(rank=4)
    pair = DistillationModel(
        {"a": make_vit(seed=0), "b": make_vit(64, 6, seed=3)}, make_vit(32, 4, seed=1), config,
        {"a": TeacherSettings(layers=[2, 5]), "b": TeacherSettings(weight=0.0, layers=[3, 5])},
    ).train()  # fmt: skip
    outputs = {}
    for name, model in (("single", single), ("named", named), ("pair", pair)):
        outputs[name] = model(images)
        outputs[name].loss.backward()
    reference = _gradients(single)
    assert set(outputs["named"].losses) == set(outputs["single"].losses) == {"kd", "outlier", "info"}
    for term, value in outputs["single"].losses.items():
        assert torch.equal(outputs["named"].losses[term], value) and torch.equal(outputs["pair"].losses[f"a/{term}"], value)
    assert torch.equal(outputs["named"].loss, outputs["single"].loss) and torch.equal(outputs["pair"].loss, outputs["single"].loss)
    reference = {key.replace("methods.default.default.", "methods.default.a.").replace("teachers.default.", "teachers.a."): value
                 for key, value in reference.items()}  # fmt: skip
    named_gradients, pair_gradients = _gradients(named), _gradients(pair)
    assert named_gradients.keys() == reference.keys() and len(reference) > 20
    for key, gradient in reference.items():
        assert torch.equal(named_gradients[key], gradient), key
        assert torch.equal(pair_gradients[key], gradient), key


def _direct_moments(teacher, images, layer):
    tokens = resolve_vit(teacher).block_outputs(images)[layer].reshape(-1, resolve_vit(teacher).width).double()
    return tokens.mean(0), torch.cov(tokens.T)


def test_fitted_statistics_are_the_unrefined_features_moments_and_normalised_targets_have_unit_variance():
    model = _model()
    teachers = {name: model.teachers[name].base_model.model for name in model.teachers}
    batches = [_pixels(4, seed) for seed in range(3)]
    assert model.needs_target_normalization
    assert model.fit_target_normalization([{"pixel_values": batch} for batch in batches]) == 12
    assert not model.needs_target_normalization
    images = torch.cat(batches)
    with torch.no_grad():
        for name, layers in LAYERS.items():
            features = model.teacher_features(images, name)
            for layer in layers:
                normalization = model.target_normalizations[name][str(layer)]
                mean, covariance = _direct_moments(teachers[name], images, layer)
                assert int(normalization.tokens) == images.shape[0] * 17
                torch.testing.assert_close(normalization.mean.double(), mean, rtol=1e-5, atol=1e-5)
                # PHI-S: Q Cov Qᵀ / α² has a unit diagonal, α² the mean eigenvalue of Cov.
                torch.testing.assert_close(normalization.scale.double() ** 2, covariance.trace() / covariance.shape[0], rtol=1e-4, atol=0)
                # The KD target of every student of this teacher, on the fitting images: zero mean, unit variance per dimension.
                target = model.methods["default"][name].target(layer, features[layer]).reshape(-1, features[layer].shape[-1]).double()
                torch.testing.assert_close(target.mean(0), torch.zeros_like(target[0]), rtol=0, atol=1e-4)
                torch.testing.assert_close(target.var(0), torch.ones_like(target[0]), rtol=1e-3, atol=1e-3)
                torch.testing.assert_close(normalization.inverse(normalization(features[layer])), features[layer], rtol=1e-4, atol=1e-4)


def test_normalisation_changes_only_the_kd_target(images):
    """SiNGER's outlier and information terms read the teacher's own (refined) features, not the normalised ones."""
    plain, normalised = _model("none"), _model("phi-s")
    normalised.fit_target_normalization([_pixels(8, 0)])
    normalised.load_state_dict(plain.state_dict(), strict=False)  # same student, heads and adapters; the statistics stay
    assert not normalised.needs_target_normalization
    ours, theirs = plain(images).losses, normalised(images).losses
    for teacher in LAYERS:
        assert torch.equal(ours[f"{teacher}/outlier"], theirs[f"{teacher}/outlier"])
        assert torch.equal(ours[f"{teacher}/info"], theirs[f"{teacher}/info"])
        assert not torch.allclose(ours[f"{teacher}/kd"], theirs[f"{teacher}/kd"])


def test_moments_summed_across_ranks_fit_what_one_process_fits_on_all_images():
    """`FeatureMoments.reduce`: the sum the trainer takes over processes (here the other rank's moments added by hand)."""
    tokens = torch.randn(2, 50, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 16)
    whole, rank0, rank1 = FeatureMoments(16), FeatureMoments(16), FeatureMoments(16)
    whole.update(tokens)
    rank0.update(tokens[0])
    rank1.update(tokens[1])
    other = torch.cat([torch.tensor([float(rank1.count)], dtype=torch.float64), rank1.total, rank1.outer.flatten()])
    rank0.reduce(lambda packed: packed + other)
    assert rank0.count == whole.count
    for ours, theirs in zip(rank0.mean_and_covariance(), whole.mean_and_covariance()):
        torch.testing.assert_close(ours, theirs)


def test_state_dict_round_trip_carries_the_statistics():
    fitted = _model()
    fitted.fit_target_normalization([_pixels(8, 0)])
    state = fitted.state_dict()
    assert {key for key in state if key.startswith("target_normalizations.")} == {
        f"target_normalizations.{name}.{layer}.{buffer}" for name, layers in LAYERS.items() for layer in layers
        for buffer in ("mean", "rotation", "scale", "tokens")
    }  # fmt: skip
    fresh = _model()
    assert fresh.needs_target_normalization
    fresh.load_state_dict(state)
    assert not fresh.needs_target_normalization
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value)


def _pil_images(count, size=40):
    generator = np.random.default_rng(0)
    return [PIL.Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.parametrize("teacher_size", [48, 16])
def test_each_teacher_reads_the_images_its_own_processor_gives(teacher_size):
    """The students' augmented batch, re-normalised and resized on the device, is what the teacher's own
    processor (and build_transforms with its statistics) gives for the same crop."""
    teacher_mean, teacher_std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    processor = ViTImageProcessor(size={"height": teacher_size, "width": teacher_size}, image_mean=teacher_mean, image_std=teacher_std)
    model = DistillationModel(
        {"a": make_vit(seed=0), "b": make_vit(seed=2)}, make_vit(32, 4, seed=1), DistillationModelConfig(method="fitnet"),
        {"a": TeacherSettings(layers=[5]), "b": TeacherSettings.from_image_processor(processor, layers=[5])},
        image_statistics=STUDENT_STATS,
    )  # fmt: skip
    crops = [build_transforms(*STUDENT_STATS, IMAGE, train=True, normalize=False)(image) for image in _pil_images(4)]  # uint8, 3×32×32
    pixel_values = PixelNormalizer(*STUDENT_STATS)(torch.stack(crops))
    assert torch.equal(model.teacher_pixels(pixel_values, "a"), pixel_values)  # the students' statistics and size
    ours = model.teacher_pixels(pixel_values, "b")
    assert ours.shape == (4, 3, teacher_size, teacher_size)
    theirs = processor([v2.functional.to_pil_image(crop) for crop in crops], return_tensors="pt")["pixel_values"]
    transforms = v2.Compose([v2.Resize(teacher_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(teacher_mean, teacher_std)])
    on_tensors = torch.stack([transforms(crop) for crop in crops])
    pixel = 1.001 / 255 / min(teacher_std)  # one grey level: the processors round the resized image to uint8
    torch.testing.assert_close(ours, on_tensors, rtol=0, atol=pixel)
    difference = (ours - theirs).abs()
    assert difference.mean() < pixel / 2 and difference.max() < 1.5 * pixel  # measured: 0.28 and 1.0 grey levels (PIL's kernel is not torch's)
    # and the teacher runs on them, at its size, against the students' grid
    losses = model(pixel_values).losses
    assert torch.isfinite(losses["b/kd"]) and model.methods["default"]["b"].alignment.teacher_grid == (teacher_size // 8,) * 2


def test_teacher_settings_and_image_statistics_are_checked():
    with pytest.raises(ValueError, match=r"^normalization: must be one of \['none', 'phi-s'\], got 'pca'"):
        TeacherSettings(normalization="pca")
    with pytest.raises(ValueError, match=r"^image_std: must be > 0 for every channel"):
        TeacherSettings(image_mean=[0.5], image_std=[0.0])
    with pytest.raises(ValueError, match=r"^image_mean: give this teacher's image_mean and image_std together"):
        TeacherSettings(image_mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"^image_statistics: teachers \['b'\] have their own image_mean and image_std"):
        DistillationModel(
            {"a": make_vit(seed=0), "b": make_vit(seed=2)}, make_vit(32, 4, seed=1), DistillationModelConfig(method="fitnet"),
            {"a": TeacherSettings(layers=[5]), "b": TeacherSettings(layers=[5], image_mean=[0.5] * 3, image_std=[0.5] * 3)},
        )  # fmt: skip


# -- through the Trainer ---------------------------------------------------------------------------
def _args(output, **overrides):
    values = dict(
        output_dir=str(output), per_device_train_batch_size=8, max_steps=2, logging_steps=1, save_strategy="no",
        report_to="none", seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0, rank=4,
    )  # fmt: skip
    return FeatureDistillationArguments(**{**values, **overrides})


def _trainer(model, args, seed=0, count=32):
    images = [{"pixel_values": image} for image in _pixels(count, seed)]
    return FeatureDistillationTrainer(
        model=model, args=args, train_dataset=images, data_collator=PixelValuesCollator(),
        processing_class=ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}),
    )  # fmt: skip


def test_the_trainer_fits_the_statistics_on_a_fresh_run_and_a_resumed_run_takes_them_from_its_checkpoint(tmp_path):
    model = _model()
    _trainer(model, _args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=1)).train()
    direct = _model()
    direct.fit_target_normalization([_pixels(32, 0)])  # the 4 batches of 8 the trainer read, in another order
    for name, layers in LAYERS.items():
        for layer in layers:
            fitted, expected = model.target_normalizations[name][str(layer)], direct.target_normalizations[name][str(layer)]
            assert int(fitted.tokens) == 32 * 17
            torch.testing.assert_close(fitted.mean, expected.mean)
            torch.testing.assert_close(fitted.scale, expected.scale)

    # Resumed on other images: the statistics are the checkpoint's, not fitted again.
    resumed, fits = _model(), []
    fit = resumed.fit_target_normalization
    resumed.fit_target_normalization = lambda *args, **kwargs: fits.append(args) or fit(*args, **kwargs)
    _trainer(resumed, _args(tmp_path / "run", max_steps=2), seed=5).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert not fits
    for key, value in model.state_dict().items():
        if key.startswith("target_normalizations."):
            assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize("method", ["singer", "fitnet"])
def test_the_saved_heads_give_the_projected_teacher_features_in_each_teachers_space(tmp_path, images, method):
    model = _model(method=method)
    trainer = _trainer(model, _args(tmp_path / "run", max_steps=1, method=method, rank=4 if method == "singer" else 64))
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    saved = AutoModel.from_pretrained(str(tmp_path / "student"))
    assert (tmp_path / "student" / "distillation" / "a" / HEADS_FILE).is_file()
    model.eval()
    with torch.no_grad():
        student_features = model.student_features(images)
        hidden_states = saved(pixel_values=images, output_hidden_states=True).hidden_states
        for teacher in LAYERS:
            heads = load_teacher_heads(tmp_path / "student", teacher)
            method_object = model.methods["default"][teacher]
            features = heads(hidden_states)
            assert list(features) == method_object.teacher_layers
            for index, (t, s) in enumerate(zip(method_object.teacher_layers, method_object.student_layers)):
                normalization = model.target_normalizations[teacher][str(t)]
                expected = normalization.inverse(method_object.projectors[index](student_features[s]))
                torch.testing.assert_close(features[t], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^teacher: must be one of \['a', 'b'\]"):
        load_teacher_heads(tmp_path / "student")


PROBE = r'''
"""Two ranks fit the target normalisation through FeatureDistillationTrainer; each saves what it fitted."""
import sys

from safetensors.torch import save_file

sys.path.insert(0, sys.argv[1])
import test_multi_teacher as t
from accelerate import PartialState

model = t._model()
trainer = t._trainer(model, t._args(sys.argv[2], max_steps=1, per_device_train_batch_size=4))
trainer.train()
state = {key: value.contiguous() for key, value in model.state_dict().items() if key.startswith("target_normalizations.")}
save_file(state, f"{sys.argv[2]}/rank{PartialState().process_index}.safetensors")
'''


def test_two_processes_fit_the_same_statistics_from_both_ranks_batches(tmp_path):
    """accelerate launch, two CPU ranks over gloo: each reads its half of the 32 images; both fit the
    statistics of all 32 (the moments summed across ranks)."""
    root = Path(__file__).resolve().parents[1]
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(root / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(port),
               str(probe), str(root / "tests"), str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2)]
    direct = _model()
    direct.fit_target_normalization([_pixels(32, 0)])
    expected = {key: value for key, value in direct.state_dict().items() if key.startswith("target_normalizations.")}
    assert ranks[0].keys() == ranks[1].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        if key.endswith((".mean", ".scale", ".tokens")):
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-5)
