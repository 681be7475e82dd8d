"""FeatureDistillationTrainer: logged loss terms, gradient accumulation, resume, and the saved student."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import IMAGE, make_vit
from safetensors.torch import load_file
from transformers import ViTImageProcessor

from singer_hf import DistillationModelConfig, DistillationModel
from singer_hf.data import PixelNormalizer, PixelValuesCollator
from singer_hf.trainer import FeatureDistillationTrainer, FeatureDistillationArguments


def _images(count=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(3, IMAGE, IMAGE, generator=generator)} for _ in range(count)]


MODEL_CONFIG = {"teacher_layers": [2, 5], "rank": 8}
"""What `_model` distils with, and `_args` says it does (the trainer refuses arguments that disagree)."""


def _model(student_seed=1, **config):
    """The same teacher every time (it is never checkpointed); the trainable parts vary with the seed."""
    config = {**MODEL_CONFIG, **config}
    teacher, student = make_vit(seed=0), make_vit(32, 4, seed=student_seed)
    torch.manual_seed(student_seed)
    model = DistillationModel(teacher, student, DistillationModelConfig(**config))
    with torch.no_grad():
        for layer in model.adapters.values():
            layer.singer_up["default"].add_(0.01 * (student_seed - 1) * torch.randn_like(layer.singer_up["default"]))
    return model


def _args(tmp_path, **overrides):
    values = dict(
        **MODEL_CONFIG,
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=4,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return FeatureDistillationArguments(**values)


def _trainer(model, args, data=None):
    return FeatureDistillationTrainer(
        model=model,
        args=args,
        train_dataset=data or _images(),
        data_collator=PixelValuesCollator(),
        processing_class=ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}),
    )


def _trained_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("teacher.") or "singer_" in k}


def test_loss_terms_are_logged_and_add_up_to_the_loss(tmp_path):
    trainer = _trainer(_model(), _args(tmp_path))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss_kd" in entry]
    assert len(logs) == 2  # steps 2 and 4
    for entry in logs:
        # Trainer's own `loss` is the interval's mean total; our terms are the interval's means.
        recombined = entry["loss_kd"] + 0.01 * entry["loss_outlier"] + entry["loss_info"]
        assert entry["loss"] == pytest.approx(recombined, rel=1e-4)
        assert entry["loss_outlier"] > 0 and entry["loss_info"] > 0


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    # With 16 patches and q = 0.97, exactly one token per image is an outlier, so every loss
    # term is a per-image mean and 2 accumulated half batches equal one full batch.
    states = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model = _model()
        args = _args(tmp_path / f"ga{accumulation}", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                     max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0)
        _trainer(model, args).train()
        states.append(_trained_state(model))
    before = _trained_state(_model())
    moved = max((states[0][k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-6)


def test_resume_from_checkpoint_reaches_the_uninterrupted_result(tmp_path):
    uninterrupted = _model()
    _trainer(uninterrupted, _args(tmp_path / "full")).train()

    interrupted = _model()
    _trainer(interrupted, _args(tmp_path / "part", max_steps=4, save_strategy="steps", save_steps=2)).train()
    checkpoint = tmp_path / "part" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    resumed = _model(student_seed=5)  # other student/projector/adapter init: they must come from the checkpoint
    _trainer(resumed, _args(tmp_path / "part")).train(resume_from_checkpoint=str(checkpoint))

    expected, actual = _trained_state(uninterrupted), _trained_state(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_saved_student_is_a_plain_hf_model(tmp_path, images):
    model = _model(method="vitkd", teacher_layers=None)
    trainer = _trainer(model, _args(tmp_path / "run", max_steps=2, method="vitkd", teacher_layers=None))
    trainer.train()
    out = tmp_path / "student"
    trainer.save_model(str(out))
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    research = out / "distillation"
    config = json.loads((research / "distillation_config.json").read_text())
    assert config["method"] == "vitkd" and config["student_layers"] == model.student_layers
    heads = load_file(research / "heads.safetensors")
    assert "mask_token" in heads and any(k.startswith("generator.") for k in heads)
    assert not any(k.startswith(("teacher.", "student.")) for k in heads)

    model.eval()
    with torch.no_grad():
        expected = model.student(pixel_values=images, output_hidden_states=True).hidden_states[-1]
    torch.save(images, tmp_path / "images.pt")
    probe = (
        "import sys, torch\n"
        "from transformers import AutoImageProcessor, AutoModel\n"
        f"model = AutoModel.from_pretrained({str(out)!r}).eval()\n"
        f"AutoImageProcessor.from_pretrained({str(out)!r})\n"
        f"images = torch.load({str(tmp_path / 'images.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    features = model(pixel_values=images, output_hidden_states=True).hidden_states[-1]\n"
        f"torch.save(features, {str(tmp_path / 'features.pt')!r})\n"
        "assert 'singer_hf' not in sys.modules and 'peft' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    torch.testing.assert_close(torch.load(tmp_path / "features.pt", weights_only=True), expected)


def test_singer_run_saves_adapters_in_peft_format_and_never_the_teacher(tmp_path):
    import peft

    model = _model()
    trainer = _trainer(model, _args(tmp_path / "run", max_steps=1))
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    research = tmp_path / "student" / "distillation"
    adapters = load_file(research / "adapter_model.safetensors")
    assert adapters and all("singer_" in key for key in adapters)
    loaded = peft.PeftModel.from_pretrained(make_vit(seed=0), research)
    torch.testing.assert_close(
        loaded.base_model.singer_layers[2].singer_up["default"], model.adapters[2].singer_up["default"]
    )
    total_bytes = sum(p.stat().st_size for p in (tmp_path / "student").rglob("*") if p.is_file())
    teacher_bytes = sum(p.numel() * 4 for p in model.teacher.parameters())
    assert total_bytes < teacher_bytes  # the teacher is never written


def test_trainer_rejects_other_models_and_best_model_selection(tmp_path):
    with pytest.raises(ValueError, match="model: FeatureDistillationTrainer trains a singer_hf.DistillationModel"):
        FeatureDistillationTrainer(model=make_vit(), args=_args(tmp_path))
    args = _args(tmp_path, load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps")
    with pytest.raises(ValueError, match="load_best_model_at_end: not supported"):
        FeatureDistillationTrainer(model=_model(), args=args)
    # Arguments that say rank 64 for a rank-8 model would train rank 8 and record 64: refused.
    with pytest.raises(ValueError, match=r"^args: the model was built with other distillation settings than the arguments: rank 8 \(model\) vs 64 \(arguments\)$"):
        FeatureDistillationTrainer(model=_model(), args=_args(tmp_path, rank=64))
    with pytest.raises(ValueError, match="hub_strategy: only 'end' is supported"):
        _args(tmp_path, hub_strategy="every_save")


def test_checkpoints_hold_the_trainable_state_and_no_token(tmp_path):
    """The Trainer's own checkpoint: students, heads and adapters in model.safetensors, no teacher
    weight, the fingerprint written last, and the pickled arguments without the Hub token."""
    token = "hf_CheckpointTokenLeak0123456789abcd"
    model = _model()
    trainer = _trainer(model, _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, hub_token=token))
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(model.state_dict()) and not any(key.startswith("teachers.") and "singer_" not in key for key in saved)
    assert {"students.default.layers.0.mlp.fc1.weight", "methods.default.default.projectors.0.weight"} <= set(saved)
    assert (checkpoint / "singer_run.json").is_file()
    assert all(token.encode() not in path.read_bytes() for path in checkpoint.iterdir() if path.is_file())
    assert trainer.args.hub_token == token  # kept in memory for publishing


# -- the Trainer's model protocol ------------------------------------------------------------------
def test_evaluate_reports_the_loss_and_each_term(tmp_path):
    model = _model()
    trainer = FeatureDistillationTrainer(
        model=model, args=_args(tmp_path, per_device_eval_batch_size=8), train_dataset=_images(),
        eval_dataset=_images(16, seed=5), data_collator=PixelValuesCollator(),
    )  # fmt: skip
    metrics = trainer.evaluate()
    terms = {name: metrics[f"eval_loss_{name}"] for name in ("kd", "outlier", "info")}
    weights = model.config.weights()
    assert metrics["eval_loss"] == pytest.approx(sum(weights[name] * value for name, value in terms.items()), rel=1e-5)
    # The same batches through the model by hand (eval mode: the terms are deterministic).
    model.eval()
    with torch.no_grad():
        batches = [torch.stack([image["pixel_values"] for image in _images(16, seed=5)[i : i + 8]]) for i in (0, 8)]
        kd = sum(model(pixel_values=batch).losses["kd"] for batch in batches) / 2
    assert terms["kd"] == pytest.approx(kd.item(), rel=1e-5)


def test_activation_checkpointing_trains_the_same_student(tmp_path):
    weights = {}
    for checkpointing in (False, True):
        model = _model()
        _trainer(model, _args(tmp_path / str(checkpointing), max_steps=2, activation_checkpointing=checkpointing)).train()
        assert model.is_activation_checkpointing == model.student.is_activation_checkpointing == checkpointing
        weights[checkpointing] = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    initial = dict(_model().named_parameters())
    assert any(not torch.equal(initial[name], value) for name, value in weights[True].items())  # it trained
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_tensorboard_logging_records_the_distillation_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(_model(), _args(tmp_path, report_to="tensorboard", logging_steps=1))
    trainer.train()
    (run_dir,) = {path.parent for path in tmp_path.rglob("events.out.tfevents.*")}  # output_dir/runs/<date_host>
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    assert {"train/loss", "train/loss_kd", "train/loss_outlier", "train/loss_info"} <= set(events.Tags()["scalars"])
    config_text = [tag for tag in events.Tags()["tensors"] if "model_config" in tag]
    assert config_text, events.Tags()


def test_uint8_batches_are_normalised_on_the_device_with_the_processors_statistics(tmp_path):
    """What scripts/distill.py's workers ship: uint8 pixels; the run equals one fed the normalised floats."""
    generator = torch.Generator().manual_seed(0)
    pixels = [torch.randint(0, 256, (3, IMAGE, IMAGE), dtype=torch.uint8, generator=generator) for _ in range(16)]
    processor = ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    normalised = PixelNormalizer(processor.image_mean, processor.image_std)
    runs = {}
    for dtype, data in (("uint8", pixels), ("float32", [normalised(p) for p in pixels])):
        model = _model()
        trainer = _trainer(model, _args(tmp_path / dtype, max_steps=2, logging_steps=1), data=[{"pixel_values": p} for p in data])
        trainer.processing_class = processor
        trainer.train()
        runs[dtype] = ([e["loss"] for e in trainer.state.log_history if "loss" in e], _trained_state(model))
    assert runs["uint8"][0] == runs["float32"][0]
    assert all(torch.equal(runs["uint8"][1][k], v) for k, v in runs["float32"][1].items())
    trainer = _trainer(_model(), _args(tmp_path / "none", max_steps=1), data=[{"pixel_values": p} for p in pixels])
    trainer.processing_class = None
    with pytest.raises(ValueError, match="processing_class: uint8 pixel_values"):
        trainer.train()
