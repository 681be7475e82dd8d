"""What the faster step changes: the teacher's block loop, its early stop, its bf16 weights."""

import math

import pytest
import torch
import transformers
from conftest import IMAGE, TEACHER_FACTORIES, make_vit, tiny_config
from test_trainer import _args, _images, _model, _trainer

from singer_hf import DistillationModelConfig, DistillationModel, resolve_vit

HF_FAMILIES = {
    **{name: factory for name, factory in TEACHER_FACTORIES.items() if name != "timm_wrapper"},
    "siglip_vision_model": lambda: transformers.SiglipVisionModel(tiny_config(transformers.SiglipVisionConfig, 48, 6)),
}


@pytest.mark.parametrize("size", [IMAGE, IMAGE + 16])
@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_block_outputs_are_the_models_own_hidden_states(family, size):
    model = HF_FAMILIES[family]().eval()
    vit = resolve_vit(model)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    interpolate = {"interpolate_pos_encoding": True} if size != IMAGE and "dinov2" not in family else {}
    with torch.no_grad():
        expected = vit.backbone(pixel_values=images, output_hidden_states=True, **interpolate).hidden_states[1:]
        outputs = vit.block_outputs(images)
        first_four = vit.block_outputs(images, last_block=3)
    assert len(outputs) == vit.depth and len(first_four) == 4
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    assert all(torch.equal(a, b) for a, b in zip(first_four, outputs))


class _FullTeacherModel(DistillationModel):
    def teacher_features(self, pixel_values, teacher=None):
        with torch.no_grad():
            return resolve_vit(self.teacher).block_outputs(pixel_values)


@pytest.mark.parametrize("method", ["singer", "fitnet"])
def test_teacher_stops_after_the_deepest_distilled_block_with_the_same_losses(method, images):
    def build(model_class):
        torch.manual_seed(0)
        return model_class(make_vit(seed=0), make_vit(32, 4, seed=1), DistillationModelConfig(method=method, teacher_layers=[1, 3], rank=4))

    model, full = build(DistillationModel), build(_FullTeacherModel)
    calls = []
    for index, block in enumerate(resolve_vit(model.teacher).blocks):
        block.register_forward_hook(lambda module, args, output, index=index: calls.append(index))
    losses, full_losses = model(images).losses, full(images).losses
    assert max(calls) == 3  # blocks 4 and 5 never run
    assert losses.keys() == full_losses.keys()
    assert all(torch.equal(losses[name], full_losses[name]) for name in losses)


def test_bf16_teacher_weights_give_the_autocast_losses(images):
    def build():
        return DistillationModel(make_vit(seed=0), make_vit(32, 4, seed=1), DistillationModelConfig(teacher_layers=[2, 5], rank=4))

    model, cast = build(), build()
    cast.cast_teacher(torch.bfloat16)
    teacher_dtypes = {p.dtype for n, p in cast.teacher.named_parameters() if "singer_" not in n}
    adapter_dtypes = {p.dtype for n, p in cast.teacher.named_parameters() if "singer_" in n}
    assert teacher_dtypes == {torch.bfloat16} and adapter_dtypes == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, losses = model(images).losses, cast(images).losses
    for name in expected:
        assert losses[name].item() == pytest.approx(expected[name].item(), rel=0.02), name


def test_bf16_training_casts_the_teacher_once_and_trains_the_adapters(tmp_path, monkeypatch):
    import singer_hf.hardware

    monkeypatch.setattr(singer_hf.hardware, "native_cpu_bf16", lambda: True)  # what bf16 does, also where the CPU emulates it
    model = DistillationModel(make_vit(seed=0), make_vit(32, 4, seed=1), DistillationModelConfig(teacher_layers=[2, 5], rank=4))
    adapter = model.adapters[2].singer_up["default"]
    before = adapter.detach().clone()
    trainer = _trainer(model, _args(tmp_path, bf16=True, max_steps=2, logging_steps=1, rank=4), data=_images(16))
    assert resolve_vit(model.teacher).blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)
    assert adapter.dtype == torch.float32 and not torch.equal(adapter.detach(), before)


def test_torch_compile_compiles_each_block_and_trains_as_eager(tmp_path):
    """`--torch_compile` (inductor, the default backend; ~25 s here with a cold cache): every teacher and
    student block compiled in place, the model itself not wrapped; the run gives eager's losses and weights."""
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model()
        overrides = {"torch_compile": True} if compiled else {}
        trainer = _trainer(model, _args(tmp_path / str(compiled), max_steps=2, logging_steps=1, **overrides), data=_images(16))
        trainer.train()
        runs[compiled] = (model, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    model, losses = runs[True]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled code ran
    blocks = [*resolve_vit(model.teacher).blocks, *resolve_vit(model.student).blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert not isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.args.torch_compile  # the saved arguments still say what ran
    eager_model, eager_losses = runs[False]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    initial = dict(_model().named_parameters())
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(initial[name], value) for name, value in trained.items())
    for name, value in trained.items():
        torch.testing.assert_close(value, dict(eager_model.named_parameters())[name], rtol=1e-4, atol=1e-5, msg=name)
