"""Fault injection on scripts/distill.py: clobbered outputs, foreign checkpoints, kills, bad data, non-finite losses."""

import io
import json
import logging
import re
import shlex
import shutil
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from conftest import IMAGE, make_vit

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "distill.py"
STUDENT = "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64"


def _png(pixels: np.ndarray, mode: str = "RGB", **save) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).convert(mode).save(buffer, format="PNG", **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_vit(seed=0).save_pretrained(root / "teacher")
    transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(root / "teacher")
    rng = np.random.default_rng(0)
    images = [{"bytes": _png(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)), "path": None} for _ in range(64)]
    data = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    data.select(range(32)).to_parquet(str(root / "data.parquet"))
    (root / "shards").mkdir()  # the resume tests' data: two files, a stream shard for each of two DataLoader workers
    for shard in range(2):
        data.shard(2, shard, contiguous=True).to_parquet(str(root / "shards" / f"part-{shard}.parquet"))
    return root


def _argv(root: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--teacher_name_or_path", str(root / "teacher"), "--student_size", "tiny",
        "--student_config_overrides", STUDENT, "--dataset_name", str(root / "data.parquet"),
        "--output_dir", str(output), "--per_device_train_batch_size", "4", "--rank", "4",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
        "--artifact_stats", "false",  # no end-of-run figures (they decode images of their own): tests/test_artifacts.py
        *extra,
    ]  # fmt: skip


def test_outputs_are_never_silently_clobbered(distill, workspace, tmp_path):
    output = tmp_path / "run"
    distill.main(_argv(workspace, output, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"))
    assert (output / "checkpoint-2" / "singer_run.json").is_file()
    assert (output / "distillation" / "adapter_model.safetensors").is_file()
    before = (output / "model.safetensors").read_bytes()

    with pytest.raises(ValueError, match="output_dir: run is not empty"):
        distill.main(_argv(workspace, output, "--max_steps", "2", "--method", "fitnet"))
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: checkpoint-2 belongs to another configuration: "
                                         r"method 'singer' \(checkpoint\) vs 'fitnet' \(now\)"):
        distill.main(_argv(workspace, output, "--max_steps", "3", "--method", "fitnet", "--resume_from_checkpoint", "true"))
    assert (output / "model.safetensors").read_bytes() == before  # the refused runs wrote nothing

    distill.main(_argv(workspace, output, "--max_steps", "2", "--method", "fitnet", "--overwrite_output_dir", "true", "--save_strategy", "no"))
    assert not list(output.glob("checkpoint-*")), "the earlier run's checkpoints survived an overwrite"
    assert not (output / "distillation" / "adapter_model.safetensors").exists(), "SiNGER adapters beside a FitNet run"
    assert json.loads((output / "distillation" / "distillation_config.json").read_text())["method"] == "fitnet"


def _jpeg(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG")
    return buffer.getvalue()


def _bad_data_rows() -> tuple[list, dict[int, str]]:
    """Good RGB images with every kind of trouble mixed in; returns rows and {index: kind} of the unusable ones."""
    rng = np.random.default_rng(1)
    pixels = lambda: rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)  # noqa: E731
    rows = [{"bytes": _png(pixels()), "path": None} for _ in range(12)]
    convertible = {
        "grayscale": _png(pixels(), "L"),
        "cmyk": _jpeg(pixels(), "CMYK"),
        "rgba": _png(pixels(), "RGBA"),
        "palette": _png(pixels(), "P"),
        "16-bit": _png16(rng.integers(0, 65536, (24, 20), dtype=np.uint16)),
    }
    unusable = {
        "truncated jpeg": _jpeg(pixels())[:300],
        "random bytes": rng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "zero bytes": b"",
        "missing": None,
    }
    bad = {}
    for offset, (kind, data) in enumerate([*convertible.items(), *unusable.items()]):
        index = 1 + 2 * offset
        rows.insert(index, None if data is None else {"bytes": data, "path": None})
        if kind in unusable:
            bad[index] = kind
    return rows, bad


def _png16(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    image = PIL.Image.fromarray(values)
    assert image.mode == "I;16"
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_images_are_converted_or_skipped_and_counted_once(tmp_path, streaming):
    from torch.utils.data import DataLoader

    from singer_hf.data import ImageTransform, PixelValuesCollator, build_transforms, load_image_dataset, with_image_transform

    rows, bad = _bad_data_rows()
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_dict({"image": rows}, features=datasets.Features(image=datasets.Image())).to_parquet(str(path))
    dataset = load_image_dataset(str(path), None, "train", "image", streaming=streaming, shuffle_buffer=0)
    transform = ImageTransform(build_transforms([0.5] * 3, [0.5] * 3, IMAGE, train=True), "image")
    collator = PixelValuesCollator("image", max_bad_share=0.5, window=4)
    batches = list(DataLoader(with_image_transform(dataset, transform), batch_size=7, collate_fn=collator))
    assert sum(len(batch["pixel_values"]) for batch in batches) == len(rows) - len(bad)  # the convertible ones are used
    assert all(batch["pixel_values"].shape[1:] == (3, IMAGE, IMAGE) for batch in batches)
    assert collator.skipped == len(bad) == 4


def test_too_many_bad_images_stop_early_naming_examples_and_column(distill, workspace, tmp_path):
    rows, bad = _bad_data_rows()
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_dict({"image": rows}, features=datasets.Features(image=datasets.Image())).to_parquet(str(path))
    argv = _argv(workspace, tmp_path / "out", "--num_train_epochs", "1", "--max_bad_image_share", "0.1",
                 "--bad_image_window", "8", "--per_device_train_batch_size", "21", "--save_strategy", "no")  # fmt: skip
    argv[argv.index(str(workspace / "data.parquet"))] = str(path)
    with pytest.raises(ValueError, match=r"image_column='image': 4 of the first 21 examples have no usable image") as error:
        distill.main(argv)
    named = {int(index) for group in re.findall(r"rows? ([\d, ]+) \(", str(error.value)) for index in group.split(", ")}
    assert named == set(bad)  # map-style: the rows of the dataset
    assert not (tmp_path / "out" / "model.safetensors").exists()


def _corrupt_parquet(path: Path, count: int, bad: set[int]) -> Path:
    """`count` PNG images; those at `bad` replaced by random bytes, which PIL cannot identify."""
    rng = np.random.default_rng(2)
    rows = [
        {"bytes": rng.integers(0, 256, 300, dtype=np.uint8).tobytes() if index in bad else _png(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)),
         "path": None}
        for index in range(count)
    ]  # fmt: skip
    datasets.Dataset.from_dict({"image": rows}, features=datasets.Features(image=datasets.Image())).to_parquet(str(path))
    return path


def test_a_few_corrupt_images_are_reported_per_logging_interval_not_per_image(distill, workspace, tmp_path, caplog):
    bad = {7, 31}  # 2 % of 100 images
    argv = _argv(workspace, tmp_path / "out", "--num_train_epochs", "3", "--per_device_train_batch_size", "10",
                 "--logging_steps", "10", "--save_strategy", "no")  # fmt: skip
    argv[argv.index(str(workspace / "data.parquet"))] = str(_corrupt_parquet(tmp_path / "bad.parquet", 100, bad))
    with caplog.at_level("WARNING"):
        result = distill.main(argv)
    # Each pass meets both bad images: 6 skips in 30 steps, the first named once, then one line per
    # logging interval with the interval's count (not one line per image and pass).
    first = [r.getMessage() for r in caplog.records if r.name == "singer_hf.data"]
    assert len(first) == 1 and re.search(r"image_column='image': rows? (7|31|7, 31) \(UnidentifiedImageError: cannot identify image file\)", first[0])
    reports = [r.getMessage() for r in caplog.records if r.name == "singer_hf.trainer" and "skipped_images" in r.getMessage()]
    counts = [int(re.match(r"skipped_images: (\d+) undecodable image\(s\) dropped in steps", line).group(1)) for line in reports]
    assert sum(counts) == 6 and len(reports) == 3, reports  # one per interval of 10 steps (= one pass over the data)
    assert reports[-1].endswith("(6 of the 300 examples read so far, 2.0 %)")
    assert "0x" not in caplog.text
    logged = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert [entry["skipped_images"] for entry in logged if "loss" in entry] == [2, 4, 6]
    assert result["metrics"]["skipped_images"] == 6  # the final metrics carry the total


@pytest.mark.parametrize("streaming", [False, True])
def test_mostly_corrupt_data_stops_with_one_accurate_last_line(distill, workspace, tmp_path, capsys, streaming):
    import gc

    from singer_hf.cli import run_cli

    bad = set(range(0, 40, 2))  # 50 %
    argv = _argv(workspace, tmp_path / "out", "--max_steps", "20", "--per_device_train_batch_size", "16",
                 "--bad_image_window", "40", "--disable_tqdm", "false", "--save_strategy", "no",
                 "--streaming", str(streaming).lower(), "--shuffle_buffer", "0")  # fmt: skip
    argv[argv.index(str(workspace / "data.parquet"))] = str(_corrupt_parquet(tmp_path / "bad.parquet", 40, bad))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(distill.main, argv)
    assert exit_info.value.code == 2
    del exit_info  # its traceback holds the trainer: a progress bar left open would be drawn when collected
    gc.collect()
    err = capsys.readouterr().err
    assert "0x" not in err and "Traceback" not in err
    last = err.rstrip("\n").rsplit("\n", 1)[-1]  # nothing is printed after the error, progress bars included
    match = re.fullmatch(
        r"error: image_column='image': (\d+) of the first (\d+) examples have no usable image, more than max_bad_image_share=0\.1 "
        r"allows \(at most 4 in the first bad_image_window=40\); e\.g\. (rows|stream positions) ([\d, ]+) "
        r"\(UnidentifiedImageError: cannot identify image file\) \(run with --debug for the traceback\)",
        last,
    )
    assert match, last
    skipped, seen, where, named = int(match[1]), int(match[2]), match[3], [int(i) for i in match[4].split(", ")]
    assert seen == 16 and skipped > 4 and len(named) == 5 and set(named) <= bad  # stopped at the first batch
    if streaming:  # without a shuffle buffer the stream is the file in order: its positions are the rows
        assert (where, skipped, named) == ("stream positions", 8, [0, 2, 4, 6, 8])
    else:
        assert where == "rows"
    assert not (tmp_path / "out" / "model.safetensors").exists()


def _poison_student(model, trainer, bad_steps):
    """Fault injection: the student's first block outputs NaN on the given (1-based) optimizer steps."""

    def hook(module, args, output):
        step = trainer.state.global_step + 1
        if model.training and step in bad_steps:
            return output * float("nan")
        return output

    model.student.layers[0].register_forward_hook(hook)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])  # skipped in the kernel / put back
def test_a_nonfinite_step_is_skipped_and_named(tmp_path, caplog, optim):
    from test_trainer import _args, _model, _trained_state, _trainer
    from transformers import TrainerCallback

    states = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            states[state.global_step] = _trained_state(model)

    model = _model()
    trainer = _trainer(model, _args(tmp_path, max_steps=4, logging_steps=2, optim=optim))
    trainer.add_callback(Record())
    _poison_student(model, trainer, bad_steps={3})
    with caplog.at_level("WARNING"):
        trainer.train()
    for key in states[2]:
        assert torch.equal(states[3][key], states[2][key]), f"{key} changed on the skipped step"
        assert torch.isfinite(states[4][key]).all()
    assert any(not torch.equal(states[4][k], states[3][k]) for k in states[3]), "training did not go on after the skip"
    assert "Non-finite loss_kd, loss at step 3: skipped" in caplog.text  # the student only enters the KD term
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry.get("nonfinite_steps", 0) for entry in logged] == [0, 1]
    assert all(np.isfinite(entry["loss"]) for entry in logged)


def test_consecutive_nonfinite_steps_stop_the_run_and_nothing_broken_is_saved(tmp_path):
    from test_trainer import _args, _model, _trainer

    from singer_hf.numerics import NonFiniteLossError

    model = _model()
    trainer = _trainer(model, _args(tmp_path, max_steps=8, logging_steps=1, max_nonfinite_steps=3))
    _poison_student(model, trainer, bad_steps=set(range(2, 9)))
    with pytest.raises(NonFiniteLossError, match=r"max_nonfinite_steps: 3 consecutive optimizer steps .* \(up to step 4; loss_kd"):
        trainer.train()
    assert trainer.state.global_step == 4
    with torch.no_grad():
        next(model.student.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="student: non-finite weights"):
        trainer.save_model(str(tmp_path / "student"))
    assert not (tmp_path / "student").exists()


# -- interruption and exact resume -------------------------------------------------------------------
# Each fault is injected into a real process running the distillation command (what `python
# scripts/distill.py` runs) by a small probe, which then dies as a pre-empted or crashed job would; the
# run is resumed and compared with an uninterrupted one.
PROBE = r"""
import os, signal, sys
fault, step_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
from singer_hf.commands import distill
import safetensors.torch
from transformers import TrainerCallback

class Fault(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == step_at and fault == "sigterm":  # arrives during step `step_at`
            os.kill(os.getpid(), signal.SIGTERM)
        if state.global_step + 1 == step_at and fault.startswith("ctrl_c"):  # a terminal's Ctrl-C: the whole process group
            for _ in range(2 if fault == "ctrl_c_twice" else 1):
                os.killpg(os.getpgrp(), signal.SIGINT)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step_at and fault == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)

def save_file(tensors, path, *args, **kwargs):  # kill-during-write: die while the checkpoint's weights are written
    if fault == "kill_in_save" and f"checkpoint-{step_at}" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return original_save_file(tensors, path, *args, **kwargs)

original_save_file = safetensors.torch.save_file
safetensors.torch.save_file = save_file

class FaultyTrainer(distill.FeatureDistillationTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(Fault())

distill.FeatureDistillationTrainer = FaultyTrainer
from singer_hf.cli import run_cli
run_cli(distill.main, argv)
"""
# Streamed, the 4-example shuffle buffers are far smaller than what is read before a checkpoint: 32
# examples by step 4 (16 per worker with two), each buffer yielding half its content per refill.
RESUME_MODES = {
    "map-style, 2 workers": ["--dataloader_num_workers", "2"],
    "streaming": ["--streaming", "true", "--shuffle_buffer", "4"],
    "streaming, 2 workers": ["--streaming", "true", "--shuffle_buffer", "4", "--dataloader_num_workers", "2"],
}


def _resume_argv(workspace, output, mode, *extra):
    # Random crops and flips of random-pixel images: a resume that replays other augmentations shows.
    # 8 steps of 8 examples: one pass over the 64 images.
    return _argv(workspace, output, "--dataset_name", str(workspace / "shards"), "--max_steps", "8", "--save_steps", "4",
                 "--per_device_train_batch_size", "8", "--logging_steps", "2", *RESUME_MODES[mode], *extra)  # fmt: skip


def _run_with_fault(tmp_path, fault, step, argv):
    import os
    import subprocess

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("SINGER_DEBUG", None)
    return subprocess.run([sys.executable, str(probe), fault, str(step), *argv], capture_output=True,
                          text=True, env=env, timeout=300, start_new_session=True)  # its own process group, for Ctrl-C  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted_runs(distill, workspace, tmp_path_factory):
    """Each mode's uninterrupted run folder, its checkpoints kept."""
    runs = {}
    for mode in RESUME_MODES:
        runs[mode] = tmp_path_factory.mktemp("uninterrupted") / "run"
        distill.main(_resume_argv(workspace, runs[mode], mode))
    return runs


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_runs):
    return {mode: _final_weights(run) for mode, run in uninterrupted_runs.items()}


def _final_weights(output: Path) -> dict:
    from safetensors.torch import load_file

    weights = {f"student.{k}": v for k, v in load_file(output / "model.safetensors").items()}
    weights.update({f"heads.{k}": v for k, v in load_file(output / "distillation" / "heads.safetensors").items()})
    adapters = output / "distillation" / "adapter_model.safetensors"
    weights.update({f"adapters.{k}": v for k, v in load_file(adapters).items()})
    return weights


def _max_difference(expected: dict, actual: dict) -> float:
    assert expected.keys() == actual.keys()
    return max((expected[k] - actual[k]).abs().max().item() for k in expected)


def test_sigkill_between_saves_resumes_bit_for_bit(distill, workspace, tmp_path, uninterrupted, monkeypatch):
    from singer_hf.data import STREAM_MAP_BATCH, ImageTransform

    mode = "streaming"  # map-style is resumed after the kills below
    output = tmp_path / "run"
    killed = _run_with_fault(tmp_path, "sigkill", 7, _resume_argv(workspace, output, mode, "--save_steps", "6"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-6"]
    assert (output / "checkpoint-6" / "stream_state_rank0.pt").is_file()
    decoded = []
    decode = ImageTransform._decode
    monkeypatch.setattr(ImageTransform, "_decode", lambda self, value: decoded.append(1) or decode(self, value))
    distill.main(_resume_argv(workspace, output, mode, "--resume_from_checkpoint", "true"))
    # The stream continues from its saved position (48 examples read, 16 to go): at most one map batch
    # before it is decoded again, not the 48 examples a re-read would decode; rebuilding the shuffle
    # buffer (12 buffers' worth read) re-reads encoded examples and decodes none.
    assert len(decoded) <= 16 + STREAM_MAP_BATCH < 48
    difference = _max_difference(uninterrupted[mode], _final_weights(output))
    print(f"{mode}: max |Δ| of the final weights, resumed after SIGKILL vs uninterrupted: {difference}")
    assert difference == 0


@pytest.mark.parametrize("mode", ["streaming", "streaming, 2 workers"])
def test_a_stream_resumes_exactly_from_a_checkpoint_copied_to_a_fresh_folder(
    distill, workspace, tmp_path, uninterrupted_runs, uninterrupted, mode
):
    """The shuffle buffers have cycled several times by step 4; their content is not in the checkpoint."""
    output = tmp_path / "run"
    shutil.copytree(uninterrupted_runs[mode] / "checkpoint-4", output / "checkpoint-4")
    state = torch.load(output / "checkpoint-4" / "stream_state_rank0.pt", weights_only=True)
    assert "bytes" not in repr(state) and "PNG" not in repr(state)  # stream positions, no image
    distill.main(_resume_argv(workspace, output, mode, "--resume_from_checkpoint", "true"))
    assert _max_difference(uninterrupted[mode], _final_weights(output)) == 0


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(distill, workspace, tmp_path, uninterrupted):
    mode = "map-style, 2 workers"
    output = tmp_path / "run"
    killed = _run_with_fault(tmp_path, "kill_in_save", 8, _resume_argv(workspace, output, mode))
    assert killed.returncode == -9, killed.stderr[-2000:]
    # The partial checkpoint has no fingerprint: it is never resumed from, and the resumed run replaces it.
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert (output / "checkpoint-4" / "singer_run.json").is_file() and not (output / "checkpoint-8" / "singer_run.json").exists()
    distill.main(_resume_argv(workspace, output, mode, "--resume_from_checkpoint", "true"))
    assert _max_difference(uninterrupted[mode], _final_weights(output)) == 0
    assert (output / "checkpoint-8" / "singer_run.json").is_file()


def test_sigterm_writes_a_checkpoint_before_exiting(distill, workspace, tmp_path, uninterrupted):
    mode = "map-style, 2 workers"
    output = tmp_path / "run"
    stopped = _run_with_fault(tmp_path, "sigterm", 5, _resume_argv(workspace, output, mode))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM at step 5 after writing checkpoint-5")
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert not (output / "model.safetensors").exists()  # an unfinished student is not presented as the result
    distill.main(_resume_argv(workspace, output, mode, "--resume_from_checkpoint", "true"))
    assert _max_difference(uninterrupted[mode], _final_weights(output)) == 0


@pytest.mark.parametrize("mode", list(RESUME_MODES))
def test_ctrl_c_writes_a_checkpoint_and_prints_the_command_that_resumes(distill, workspace, tmp_path, uninterrupted, caplog, mode):
    output = tmp_path / "run"
    argv = _resume_argv(workspace, output, mode)
    stopped = _run_with_fault(tmp_path, "ctrl_c", 5, argv)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by Ctrl-C (SIGINT) at step 5 after writing checkpoint-5 to {output}; resume with: ")
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    # The command printed is the one that was run, plus --resume_from_checkpoint true.
    command = shlex.split(last.partition("; resume with: ")[2])
    assert command[0] == sys.executable and Path(command[1]).resolve() == SCRIPT
    assert command[2:] == [*argv, "--resume_from_checkpoint", "true"]
    with caplog.at_level(logging.INFO, logger="singer_hf"):
        distill.main(command[2:])
    assert "resuming from checkpoint-5 (step 5 of 8)" in caplog.text
    # Logged epochs continue where the interrupted run left them: 8 steps of 8 of the 64 images are one epoch.
    logged = [entry for entry in json.loads((output / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6, 8]
    assert [entry["epoch"] for entry in logged] == pytest.approx([entry["step"] / 8 for entry in logged])
    assert _max_difference(uninterrupted[mode], _final_weights(output)) == 0


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(workspace, tmp_path):
    output = tmp_path / "run"
    stopped = _run_with_fault(tmp_path, "ctrl_c_twice", 5, _resume_argv(workspace, output, "map-style, 2 workers"))
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == "error: interrupted"
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4"]  # the last complete one, kept


# -- safe loading and secrets ------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("target", ["optimizer.pt", "pytorch_model.bin"])
def test_a_checkpoint_holding_a_malicious_pickle_is_refused(distill, workspace, tmp_path, target):
    output = tmp_path / "run"
    argv = _argv(workspace, output, "--max_steps", "3", "--save_steps", "2")
    distill.main(argv)
    checkpoint, marker = output / "checkpoint-2", tmp_path / "pwned"
    if target == "pytorch_model.bin":
        (checkpoint / "model.safetensors").unlink()  # weights only as a pickle: transformers would fall back to it
    torch.save({"state": _Payload(marker)}, checkpoint / target)
    # Refused either way: optimizer state is unpickled weights-only; weights are read from safetensors only.
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported global|no file named model.safetensors"):
        distill.main([*argv, "--resume_from_checkpoint", str(checkpoint)])
    assert not marker.exists(), "the pickle's payload ran"


def test_a_teacher_with_pickled_weights_only_is_refused(distill, workspace, tmp_path):
    teacher = tmp_path / "pickled_teacher"
    make_vit(seed=0).save_pretrained(teacher)
    transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(teacher)
    (teacher / "model.safetensors").unlink()
    torch.save({"state": _Payload(tmp_path / "pwned")}, teacher / "pytorch_model.bin")
    argv = _argv(workspace, tmp_path / "out", "--max_steps", "1")
    argv[argv.index(str(workspace / "teacher"))] = str(teacher)
    with pytest.raises(OSError, match="model.safetensors"):
        distill.main(argv)
    assert not (tmp_path / "pwned").exists()


def test_no_token_and_no_local_path_in_what_a_run_writes(distill, workspace, tmp_path, monkeypatch, capsys, caplog):
    token = "hf_FakeTokenForTheLeakTest0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    output = tmp_path / "run"
    with caplog.at_level("INFO"):
        distill.main(_argv(workspace, output, "--max_steps", "2", "--save_steps", "2", "--hub_token", token))
    written = [path for path in output.rglob("*") if path.is_file()]
    assert any(path.name == "adapter_config.json" for path in written)
    for path in written:
        assert token.encode() not in path.read_bytes(), f"{path.relative_to(output)} holds the token"
    published = [path for path in written if path.suffix in (".json", ".md") and "checkpoint-" not in str(path)]
    for path in published:
        text = path.read_text()
        assert str(workspace) not in text and str(tmp_path) not in text, f"{path.relative_to(output)} holds a local path"
    adapter_config = json.loads((output / "distillation" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "teacher"
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err + caplog.text


def test_one_rank_dying_ends_the_two_process_run_with_a_clear_error(tmp_path):
    """A real two-process launch (see tests/test_multiprocess.py); rank 1 is SIGKILLed after step 2."""
    import os
    import subprocess

    from test_multiprocess import CONFIG, _free_port, _write_tiny_setup

    teacher, data = _write_tiny_setup(tmp_path)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.replace("state.global_step == step_at and fault", "state.global_step == step_at and args.process_index == 1 and fault"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(CONFIG),
        "--main_process_port", str(_free_port()),
        str(probe), "sigkill", "2", "--teacher_name_or_path", str(teacher), "--student_size", "tiny",
        "--student_config_overrides", STUDENT, "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
        "--max_steps", "6", "--per_device_train_batch_size", "4", "--rank", "4", "--report_to", "none",
        "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip
    launch = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)  # a hang fails here
    output = launch.stdout + launch.stderr
    assert launch.returncode != 0
    assert "error: rank 0: another process of this run stopped or hung" in output, output[-3000:]
    assert "exitcode: -9" in output and "local_rank: 1" in output, output[-3000:]  # torchrun names the rank that died
