"""Two real processes: `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` runs
scripts/distill.py on CPU, as docs/training.md says (Accelerate starts the two ranks with torchrun; no MPI,
no hostfile; they talk over gloo).

One launch serves every test here (it is the slow part): inside the two processes a small probe
runs `distill.main` twice, map-style data then the same data streamed, with `FeatureDistillationTrainer`
replaced by a subclass that records, per rank, into ``<mode>_rank<r>.safetensors``:

- ``local_grad.*``: this rank's own gradients of step 1, computed from its batch alone;
- ``grad.*``: the gradients the optimizer steps with at step 1, after DDP's all-reduce;
- ``init.*`` / ``weight.*``: the trainable parameters at the start / the whole model at the end;
- ``ids``, ``local_loss``: which examples the rank read (image i has the constant red value 4·i,
  which cropping, flipping and normalising keep recoverable) and its per-step loss;
- ``<mode>_writes_rank<r>.txt``: the files each rank wrote through singer_hf.layout's ``save_file``.

A third run in the same launch trains a group of two students (``--students``, ``--max_grad_norm``).

Nothing of Accelerate, DDP or the Trainer is mocked.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from singer_hf.modeling import DistillationModel

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "accelerate_configs" / "cpu_2proc.yaml"
MODES = ("map_style", "streaming")
# The same launch also trains a group (map-style): a SiNGER and a FitNet student, each clipped on its own.
GROUP = "- {name: singer, rank: 4}\n- {name: fitnet, method: fitnet}\n"
GROUP_MAX_GRAD_NORM = 1e-3
LAUNCHED = (*MODES, "students")
WORLD, BATCH, STEPS, EXAMPLES = 2, 4, 3, 64
LAUNCH_TIMEOUT_S = 420

PROBE = r'''
"""Runs the distillation command's main() (scripts/distill.py) once per mode, recording per-rank state (see tests/test_multiprocess.py)."""
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainerCallback

from singer_hf.commands import distill

out_dir, modes, GROUP_MAX_GRAD_NORM, common = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4:]


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class Probe(TrainerCallback):
    def __init__(self, trainer, mode):
        self.trainer, self.mode, self.record = trainer, mode, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for name, p in trainable(model).items():
            self.record[f"init.{name}"] = p.detach().clone()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # step 1: backward and DDP's all-reduce done, update not yet
            for name, p in trainable(model).items():  # every one has a gradient (DDP runs without find_unused)
                self.record[f"grad.{name}"] = p.grad.detach().clone()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        for name, value in model.state_dict().items():
            self.record[f"weight.{name}"] = value.detach().clone().contiguous()
        self.record["ids"] = torch.cat(trainer.probe_ids)
        self.record["red_spread"] = torch.stack(trainer.probe_spread).amax().reshape(1)
        self.record["local_loss"] = torch.stack(trainer.probe_losses)
        metadata = {
            "process_index": str(args.process_index),
            "world_size": str(args.world_size),
            "distributed_type": str(trainer.accelerator.distributed_type),
            "backend": dist.get_backend() if dist.is_initialized() else "none",
            "global_step": str(state.global_step),
            "find_unused_parameters": str(getattr(trainer.model_wrapped, "find_unused_parameters", None)),
        }
        save_file(self.record, os.path.join(out_dir, f"{self.mode}_rank{args.process_index}.safetensors"), metadata)


class ProbeTrainer(distill.FeatureDistillationTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe = Probe(self, MODE)
        self.add_callback(self.probe)
        self.probe_ids, self.probe_spread, self.probe_losses = [], [], []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if inputs["pixel_values"].dtype == torch.uint8:  # what the workers ship: the red value read directly
            red = inputs["pixel_values"][:, 0].float().flatten(1)
        else:
            mean, std = self.processing_class.image_mean[0], self.processing_class.image_std[0]
            red = ((inputs["pixel_values"][:, 0] * std + mean) * 255).round().flatten(1)
        pixels = self._normalised(inputs)["pixel_values"]  # as compute_loss normalises them on the device
        self.probe_ids.append(red.amin(1) / 4)
        self.probe_spread.append((red.amax(1) - red.amin(1)).amax())
        # This rank's loss and, at step 1, gradients on its own batch: the unwrapped module, outside
        # DDP, and autograd.grad, so no .grad is touched and no all-reduce hook fires.
        unwrapped = self.accelerator.unwrap_model(model)
        local = unwrapped(pixel_values=pixels).loss
        self.probe_losses.append(local.detach())
        if len(self.probe_losses) == 1:
            params = trainable(unwrapped)
            grads = torch.autograd.grad(local, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    self.probe.record[f"local_grad.{name}"] = grad
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def logged_save_file(tensors, path, *args, **kwargs):
    """singer_hf.layout's save_file, noting which rank wrote what."""
    from accelerate import PartialState

    with open(os.path.join(out_dir, f"{MODE}_writes_rank{PartialState().process_index}.txt"), "a") as log:
        log.write(os.path.relpath(path, out_dir) + "\n")
    return save_file(tensors, path, *args, **kwargs)


distill.FeatureDistillationTrainer = ProbeTrainer  # main() looks the name up in its module when it runs
sys.modules["singer_hf.layout"].save_file = logged_save_file
for MODE in modes:
    out = os.path.join(out_dir, MODE)
    group = ["--students", os.path.join(out_dir, "students.yaml"), "--max_grad_norm", GROUP_MAX_GRAD_NORM] if MODE == "students" else []
    distill.main(common + ["--streaming", str(MODE == "streaming").lower(), "--output_dir", out, *group])
'''


def _write_tiny_setup(root: Path) -> tuple[Path, Path]:
    import datasets
    import numpy as np
    import PIL.Image
    import transformers

    teacher = root / "teacher"
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, layer_norm_eps=1e-6,
    )  # fmt: skip
    transformers.ViTModel(config).save_pretrained(teacher)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(teacher)

    rng = np.random.default_rng(0)
    images = []
    for index in range(EXAMPLES):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        pixels[..., 0] = 4 * index  # the example's id, readable from pixel_values after the transforms
        png = io.BytesIO()
        PIL.Image.fromarray(pixels).save(png, format="PNG")
        images.append({"bytes": png.getvalue(), "path": None})
    data = root / "images.parquet"
    datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image()).to_parquet(str(data))
    return teacher, data


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Runs the two-process launch once; returns {mode: [rank-0 record, rank-1 record]} and the folder."""
    root = tmp_path_factory.mktemp("multiprocess")
    teacher, data = _write_tiny_setup(root)
    probe = root / "probe_distill.py"
    probe.write_text(PROBE)
    results = root / "results"
    results.mkdir()
    (results / "students.yaml").write_text(GROUP)

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ACCELERATE_", "OMPI_COMM_WORLD_", "PMI_"))
        and key not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    }
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(root / "hf_home"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        "--config_file", str(CONFIG),
        "--main_process_port", str(_free_port()),
        str(probe), str(results), ",".join(LAUNCHED), str(GROUP_MAX_GRAD_NORM),
        "--teacher_name_or_path", str(teacher),
        "--student_size", "tiny",
        "--student_config_overrides", "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64",
        "--dataset_name", str(data),
        "--shuffle_buffer", "0",  # the stream in file order, so test_stream_... knows what to expect
        "--max_steps", str(STEPS),
        "--per_device_train_batch_size", str(BATCH),
        "--rank", "4",
        "--report_to", "none",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--seed", "0",
    ]  # fmt: skip
    # Own session, so a timeout can stop torchrun and both ranks, not only the launcher.
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"accelerate launch did not finish in {LAUNCH_TIMEOUT_S} s; output tail:\n{output[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"accelerate launch exited with {process.returncode}; output tail:\n{output[-6000:]}")

    records, metadata = {}, {}
    for mode in LAUNCHED:
        paths = [results / f"{mode}_rank{rank}.safetensors" for rank in range(WORLD)]
        missing = [path.name for path in paths if not path.is_file()]
        assert not missing, f"{mode}: no per-rank record {missing}; output tail:\n{output[-6000:]}"
        records[mode] = [load_file(path) for path in paths]
        metadata[mode] = [safe_open(path, "pt").metadata() for path in paths]
    return {"records": records, "metadata": metadata, "results": results}


def _adapter_keys(record, prefix):
    keys = [key for key in record if key.startswith(prefix) and ".singer_" in key]
    assert keys, f"no SiNGER adapter entries under {prefix!r}"
    return keys


@pytest.mark.parametrize("mode", MODES)
def test_launch_ran_two_gloo_processes(launched, mode):
    for rank, meta in enumerate(launched["metadata"][mode]):
        assert meta["process_index"] == str(rank)
        assert meta["world_size"] == str(WORLD), "accelerate launch started a single process"
        assert meta["distributed_type"] == "DistributedType.MULTI_CPU"
        assert meta["backend"] == "gloo"
        assert meta["global_step"] == str(STEPS)
        # DDP raises at the second step if a trainable parameter got no gradient at the first.
        assert meta["find_unused_parameters"] == "False"


@pytest.mark.parametrize("mode", MODES)
def test_ranks_read_different_data(launched, mode):
    rank0, rank1 = launched["records"][mode]
    for record in (rank0, rank1):
        assert record["red_spread"].item() == 0, "the red channel no longer encodes the example id"
        ids = record["ids"]
        assert len(ids) == BATCH * STEPS and torch.equal(ids, ids.round()) and 0 <= ids.min() and ids.max() < EXAMPLES
    assert not set(rank0["ids"].tolist()) & set(rank1["ids"].tolist()), "the two ranks read the same examples"
    # Different data, so different losses and different local gradients: otherwise equal grads prove nothing.
    assert not torch.allclose(rank0["local_loss"][0], rank1["local_loss"][0])
    for key in _adapter_keys(rank0, "local_grad."):
        assert not torch.allclose(rank0[key], rank1[key]), f"{key}: same local gradient on both ranks"


@pytest.mark.parametrize("mode", MODES)
def test_gradients_are_all_reduced(launched, mode):
    rank0, rank1 = launched["records"][mode]
    grads = sorted(key for key in rank0 if key.startswith("grad."))
    assert grads == sorted(key for key in rank1 if key.startswith("grad."))
    assert sorted("local_" + key for key in grads) == sorted(key for key in rank0 if key.startswith("local_grad."))
    adapters = _adapter_keys(rank0, "grad.")
    assert len(adapters) == 4  # singer_down and singer_up on the two distilled teacher blocks
    for key in grads:
        assert torch.equal(rank0[key], rank1[key]), f"{key}: the ranks step with different gradients"
        # DDP averages: what each rank steps with is the mean of the two ranks' own gradients.
        mean = (rank0["local_" + key] + rank1["local_" + key]) / 2
        torch.testing.assert_close(rank0[key], mean, rtol=1e-5, atol=1e-8)
    for key in adapters:
        assert rank0[key].abs().sum() > 0, f"{key}: no gradient reached the adapter"


@pytest.mark.parametrize("mode", MODES)
def test_ranks_end_with_identical_weights(launched, mode):
    rank0, rank1 = launched["records"][mode]
    weights = sorted(key for key in rank0 if key.startswith("weight."))
    assert weights == sorted(key for key in rank1 if key.startswith("weight."))
    for key in weights:
        assert torch.equal(rank0[key], rank1[key]), f"{key}: the ranks' weights diverged"
    # ...and they trained: identical but untouched weights would prove nothing.
    adapters = _adapter_keys(rank0, "weight.")
    assert len(adapters) == 4
    for key in adapters:
        assert not torch.equal(rank0[key], rank0["init." + key.removeprefix("weight.")]), f"{key} never changed"
    student = [key for key in weights if key.startswith("weight.students.default.")]
    trainable = [key for key in student if "init." + key.removeprefix("weight.") in rank0]
    moved = [key for key in trainable if not torch.equal(rank0[key], rank0["init." + key.removeprefix("weight.")])]
    assert len(moved) > len(trainable) // 2 > 0, f"only {len(moved)}/{len(trainable)} trainable student tensors changed"
    # The student the main process saved is the one both ranks hold.
    import transformers

    saved = transformers.AutoModel.from_pretrained(launched["results"] / mode).state_dict()
    assert sorted(saved) == sorted(key.removeprefix("weight.students.default.") for key in student)
    for key in student:
        assert torch.equal(saved[key.removeprefix("weight.students.default.")], rank0[key]), f"{key}: saved student differs"


@pytest.mark.parametrize("mode", MODES)
def test_no_example_is_read_twice(launched, mode):
    rank0, rank1 = launched["records"][mode]
    ids = torch.cat([rank0["ids"], rank1["ids"]]).tolist()
    assert len(set(ids)) == len(ids) == WORLD * BATCH * STEPS


def test_stream_is_read_without_gaps(launched):
    """With shuffle_buffer 0 the stream is the file in order: the first steps read its first examples."""
    rank0, rank1 = launched["records"]["streaming"]
    ids = sorted(torch.cat([rank0["ids"], rank1["ids"]]).long().tolist())
    assert ids == list(range(WORLD * BATCH * STEPS))


@pytest.mark.parametrize("mode", MODES)
def test_only_the_main_process_writes_the_output(launched, mode):
    writes = [launched["results"] / f"{mode}_writes_rank{rank}.txt" for rank in range(WORLD)]
    assert writes[0].read_text().split() == [f"{mode}/distillation/heads.safetensors"]
    assert not writes[1].exists(), f"rank 1 wrote {writes[1].read_text().split()}"


def test_a_group_of_students_trains_over_two_processes_each_clipped_on_its_own(launched):
    rank0, rank1 = launched["records"]["students"]
    for rank, meta in enumerate(launched["metadata"]["students"]):
        assert (meta["process_index"], meta["world_size"], meta["backend"]) == (str(rank), str(WORLD), "gloo")
        assert meta["global_step"] == str(STEPS) and meta["find_unused_parameters"] == "False"
    grads = sorted(key for key in rank0 if key.startswith("grad."))
    assert grads == sorted(key for key in rank1 if key.startswith("grad."))
    norms = {}
    for name in ("singer", "fitnet"):
        adapter = DistillationModel.adapter_name(name)
        own = [key for key in grads if f"students.{name}." in key or f"methods.{name}." in key or key.endswith(f".{adapter}")]
        assert any(f"students.{name}." in key for key in own) and any(f"methods.{name}." in key for key in own)
        assert all(torch.equal(rank0[key], rank1[key]) for key in own), f"{name}: the ranks step with different gradients"
        # After DDP's all-reduce, each student's gradients are clipped to the norm on their own.
        norms[name] = torch.stack([rank0[key].double().norm() for key in own]).norm().item()
    assert all(abs(norm - GROUP_MAX_GRAD_NORM) < 1e-4 * GROUP_MAX_GRAD_NORM for norm in norms.values()), norms
    assert any(key.endswith(f".{DistillationModel.adapter_name('singer')}") and ".singer_down." in key for key in grads)  # the SiNGER student's adapters
    weights = sorted(key for key in rank0 if key.startswith("weight."))
    assert all(torch.equal(rank0[key], rank1[key]) for key in weights)
    import transformers

    for name in ("singer", "fitnet"):  # one student folder each, written by the main process only
        saved = transformers.AutoModel.from_pretrained(launched["results"] / "students" / name).state_dict()
        for key, value in saved.items():
            assert torch.equal(value, rank0[f"weight.students.{name}.{key}"]), f"{name}: {key} saved differs"
    assert sorted(launched["results"].joinpath("students_writes_rank0.txt").read_text().split()) == [
        "students/fitnet/distillation/heads.safetensors", "students/singer/distillation/heads.safetensors"
    ]
    assert not launched["results"].joinpath("students_writes_rank1.txt").exists()
