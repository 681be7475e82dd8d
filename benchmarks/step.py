#!/usr/bin/env python
"""Speed of one SiNGER training step, ours against the official code's, measured side by side.

    python benchmarks/step.py                                    # CPU default: ViT-S-width → ViT-Ti-width, 64px
    python benchmarks/step.py --pair vit-l-to-ti-224 --batch_size 128 --device cuda --modes reference bf16
    python benchmarks/step.py --students same                    # three students in one pass vs three steps
    python benchmarks/step.py --artifact_stats                   # the cost of the logged artifact statistics

A step is what the Trainer runs: the batch arrives as uint8 pixels (what the DataLoader workers ship,
pinned on a GPU host), is copied to the device without blocking and normalised there; teacher forward,
adapters, the three losses, backward, a fused AdamW step on the student, projectors and adapters (the
Trainer's default optimiser). Models are built from configs with random weights (speed does not depend
on them), every mode from the same seed, so they start from identical weights. Modes:

- `reference`: what the official code does: the teacher's weights left trainable, so block
  l+1 of the information loss accumulates weight gradients, and block l+1 re-run on F^l although the
  teacher forward already computed F^{l+1}; the whole teacher runs; fp32.
- `fp32`: `DistillationModel` as the Trainer runs it in fp32.
- `bf16-autocast`: the same under bf16 autocast, the frozen teacher's weights kept in fp32.
- `bf16`: bf16 autocast with the frozen teacher's weights cast to bf16 once (what `--bf16` does).
- `fp32-compiled`, `bf16-compiled`: the same with every teacher and student block compiled
  (regional compilation: one compiled graph reused by the repeated blocks).
- `teacher-bf16`: the teacher's forward alone in bf16, to compare with published inference figures.

After `--warmup` rounds, each round runs one step of every mode in turn (A, B, C, A, B, C, ...), so
that load from other processes falls on all modes alike; ratios are medians of the per-round ratios.
Steps are timed by a clock chosen by the device: the host's wall clock on a CPU, CUDA events on a GPU
(no synchronisation inside a round; one per round). The losses compared are each mode's first step's,
at the initial weights on the same batch. FLOPs are counted analytically (forward, and backward as
twice the forward) for the work the step needs, the same count for every mode; the reference does more.

`--students GROUP` times instead a group of students trained in one pass (one `DistillationModel`
with several students: one teacher forward, one optimiser over every student's parameters, one
backward of the summed loss) against each student's own one-student step (its own teacher forward),
interleaved the same way, in one `--modes` mode: `same` (three of the pair's student), `family`
(its width 1x, 2x, 4x: ViT-Ti, S, B-like), `methods` (SiNGER, FitNet, ViTKD). Student k is drawn
from seed `--seed` + 1 + k for both, so each starts from the same weights in the group and alone, and
the losses of its first steps are compared: they are equal. The FLOP count gives the bound on the
ratios: the group does one teacher forward and each student's work (forward and backward, heads,
SiNGER's adapters and block l+1), the separate steps all of it once per student.
`--artifact_stats` times one mode's step with and without the artifact statistics the Trainer logs by
default (computed from the step's own features, accumulated on the device as the Trainer does),
interleaved on one model, and prints the ratio; the default is on only while it stays <= 1.02x.
benchmarks/gpu_suite.py runs these same steps as one budgeted GPU measurement.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import resource
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass, field

import torch
import transformers
from transformers import HfArgumentParser
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from singer_hf import DistillationModel, DistillationModelConfig, map_layers, resolve_vit
from singer_hf.data import PixelNormalizer
from singer_hf.architectures import BlockOutputs
from singer_hf.trainer import FeatureDistillationTrainer


@dataclass(frozen=True)
class Pair:
    teacher: tuple[int, int, int]
    """Teacher (width, blocks, heads); MLP ratio 4."""
    student: tuple[int, int, int]
    image_size: int
    patch_size: int
    teacher_layers: tuple[int, ...]


PAIRS = {
    # The CPU pair: ViT-S width teacher, ViT-Ti width student, small images.
    "vit-s-to-ti-64": Pair((384, 12, 6), (192, 12, 3), 64, 8, (8, 11)),
    "vit-b-to-ti-224": Pair((768, 12, 12), (192, 12, 3), 224, 16, (8, 11)),
    # The paper's pair: ViT-L/16 → ViT-Ti/16 at 224.
    "vit-l-to-ti-224": Pair((1024, 24, 16), (192, 12, 3), 224, 16, (17, 23)),
    # Seconds on a CPU: what the tests run the benchmarks with.
    "tiny": Pair((64, 4, 2), (32, 4, 2), 32, 8, (2, 3)),
}


@dataclass(frozen=True)
class Mode:
    official: bool
    autocast: bool
    teacher_bf16: bool
    compile: bool = False
    teacher_only: bool = False
    artifact_stats: bool = False
    """The step also computes and accumulates the artifact statistics, as the Trainer does with `--artifact_stats`."""


MODES = {
    "reference": Mode(official=True, autocast=False, teacher_bf16=False),
    "fp32": Mode(official=False, autocast=False, teacher_bf16=False),
    "bf16-autocast": Mode(official=False, autocast=True, teacher_bf16=False),
    "bf16": Mode(official=False, autocast=True, teacher_bf16=True),
    "fp32-compiled": Mode(official=False, autocast=False, teacher_bf16=False, compile=True),
    "bf16-compiled": Mode(official=False, autocast=True, teacher_bf16=True, compile=True),
    "teacher-bf16": Mode(official=False, autocast=True, teacher_bf16=True, teacher_only=True),
}


@dataclass(frozen=True)
class Member:
    """One student of a group: the pair's student at `scale` times its width and heads, distilled by `method`."""

    scale: int = 1
    method: str = "singer"

    def shape(self, pair: Pair) -> tuple[int, int, int]:
        width, depth, heads = pair.student
        return self.scale * width, depth, self.scale * heads


GROUPS = {
    # Three students of the pair's student's size.
    "same": (Member(), Member(), Member()),
    # Widths 1x, 2x, 4x: ViT-Ti, ViT-S and ViT-B-like (12 blocks each).
    "family": (Member(1), Member(2), Member(4)),
    # The paper's comparison: one student per method.
    "methods": (Member(method="singer"), Member(method="fitnet"), Member(method="vitkd")),
}
"""Groups of students trained in one pass (`--students`), timed against each student's own step."""

H100_PEAK_TFLOPS = 989.4
"""Dense bf16 peak of an H100 SXM (NVIDIA's datasheet: 1,979 TFLOP/s with sparsity): the paper pair's limit."""


@dataclass
class BenchmarkArguments:
    pair: str = field(default="vit-s-to-ti-64", metadata={"help": f"One of {sorted(PAIRS)}."})
    batch_size: int = field(default=16, metadata={"help": "Images per step."})
    modes: list[str] | None = field(
        default=None, metadata={"help": f"Any of {list(MODES)}; default: reference fp32 bf16. With --students, one training mode; default fp32."}
    )
    students: str | None = field(
        default=None,
        metadata={"help": f"Time a group of students in one pass against each student's own step instead: one of {list(GROUPS)}."},
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (CPU); default: torch's."})
    steps: int = field(default=10, metadata={"help": "Timed rounds (one step of every mode each)."})
    warmup: int = field(default=3, metadata={"help": "Untimed rounds first."})
    peak_tflops: float = field(default=H100_PEAK_TFLOPS, metadata={"help": "Peak the achieved TFLOP/s are a share of."})
    artifact_stats: bool = field(
        default=False,
        metadata={
            "help": "Time one --modes mode (default fp32) with and without the artifact statistics the Trainer logs "
            "(--artifact_stats), on one model, interleaved, and print the ratio."
        },
    )
    seed: int = 0


class OfficialCodeModel(DistillationModel):
    """`DistillationModel` with the official code's costs: trainable teacher weights, block
    l+1 re-run on F^l instead of reading F^{l+1} from the teacher forward, and every student block run."""

    def __init__(self, teacher, student, config):
        super().__init__(teacher, student, config)
        self.teacher.requires_grad_(True)

    def teacher_features(self, pixel_values: torch.Tensor, teacher_name: str | None = None) -> BlockOutputs:
        teacher = resolve_vit(self.teacher)
        with torch.no_grad():
            outputs = teacher.block_outputs(pixel_values)
        features = list(outputs)
        for layer in self.teacher_layers[:-1]:
            features[layer + 1] = teacher.run_block(layer + 1, features[layer], outputs.block_kwargs)  # with weight gradients
        return BlockOutputs(features, outputs.block_kwargs)

    def student_features(self, pixel_values: torch.Tensor, student_name: str | None = None) -> tuple[torch.Tensor, ...]:
        return resolve_vit(self.student).block_outputs(pixel_values)


def vit_config(width: int, depth: int, heads: int, pair: Pair) -> transformers.ViTConfig:
    return transformers.ViTConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        image_size=pair.image_size,
        patch_size=pair.patch_size,
        layer_norm_eps=1e-6,
    )


@functools.cache
def _initial_backbones(pair: Pair, seed: int):
    """Teacher (as loaded from a classification checkpoint: no pooler) and student (as scripts/distill.py
    builds one from scratch), drawn once per pair and seed: every mode copies the same weights."""
    torch.manual_seed(seed)
    return transformers.ViTModel(vit_config(*pair.teacher, pair), add_pooling_layer=False), transformers.ViTModel(vit_config(*pair.student, pair))


def build(pair: Pair, mode: Mode, device: torch.device, seed: int, compile_options: dict | None = None):
    """The model and its optimiser; `compile_options` go to `torch.compile` in the compiled modes."""
    teacher, student = copy.deepcopy(_initial_backbones(pair, seed))
    torch.manual_seed(seed)  # the projectors
    model_class = OfficialCodeModel if mode.official else DistillationModel
    model = model_class(teacher, student, DistillationModelConfig(teacher_layers=list(pair.teacher_layers)))
    return _prepared(model, mode, device, compile_options)


def _prepared(model: DistillationModel, mode: Mode, device: torch.device, compile_options: dict | None):
    model = model.to(device)
    if mode.teacher_bf16:
        model.cast_teacher(torch.bfloat16)
    if mode.compile:
        model.compile_blocks(**(compile_options or {}))
    model.train()
    # What the optimiser updates: each student, its heads and adapters (the model's own list); never the
    # teacher's own weights, though the reference leaves them trainable.
    trainable = [parameter for name in model.students for parameter in model.student_parameters(name)]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-4, fused=True)
    return model, optimizer


@functools.cache
def _group_student(pair: Pair, shape: tuple[int, int, int], seed: int) -> transformers.ViTModel:
    torch.manual_seed(seed)
    return transformers.ViTModel(vit_config(*shape, pair))


def group_students(pair: Pair, group: tuple[Member, ...], seed: int) -> dict[str, tuple[transformers.ViTModel, DistillationModelConfig]]:
    """Each student of `group` by name, with its config: student k drawn from seed `seed + 1 + k`, so
    its model in one pass and its model alone start from the same weights."""
    return {
        f"student{index}": (
            _group_student(pair, member.shape(pair), seed + 1 + index),
            DistillationModelConfig(method=member.method, teacher_layers=list(pair.teacher_layers)),
        )
        for index, member in enumerate(group)
    }


def build_group(pair: Pair, group: tuple[Member, ...], mode: Mode, device: torch.device, seed: int, compile_options: dict | None = None) -> dict:
    """`"group"`: one model training every student of `group` from one teacher pass, with one optimiser;
    `"<student> alone"`: each student's own one-student model (its own teacher) and optimiser. Each
    model is built after seeding with `seed`, as `build` does: a student's heads start the same in both."""
    teacher, _ = _initial_backbones(pair, seed)
    students = group_students(pair, group, seed)
    built = {}
    for name, chosen in {"group": students, **{f"{name} alone": {name: students[name]} for name in students}}.items():
        torch.manual_seed(seed)
        models, configs = {key: copy.deepcopy(model) for key, (model, _) in chosen.items()}, {key: config for key, (_, config) in chosen.items()}
        if len(chosen) == 1:  # the one-student model as users build it
            (models,), (configs,) = models.values(), configs.values()
        built[name] = _prepared(DistillationModel(copy.deepcopy(teacher), models, configs), mode, device, compile_options)
    return built


def host_pixels(pair: Pair, batch_size: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """A batch as scripts/distill.py's DataLoader workers ship it: uint8 pixels, pinned when bound for a GPU."""
    size = (batch_size, 3, pair.image_size, pair.image_size)
    pixels = torch.randint(0, 256, size, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return pixels.pin_memory() if device.type == "cuda" else pixels


_normalize = PixelNormalizer(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def device_pixels(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What the Trainer does with each batch: a copy that does not block the host, normalised on the device."""
    return _normalize(pixels.to(device, non_blocking=True))


def forward(model, pixel_values, mode: Mode):
    with torch.autocast(pixel_values.device.type, dtype=torch.bfloat16, enabled=mode.autocast):
        return model(pixel_values=pixel_values, **({"artifact_stats": True} if mode.artifact_stats else {}))


_logged = types.SimpleNamespace(_metrics={"train": {}})
"""The running sums the Trainer keeps between logs (`FeatureDistillationTrainer.record_metrics`)."""


def train_step(model, optimizer, pixels: torch.Tensor, mode: Mode, device: torch.device) -> dict[str, torch.Tensor] | None:
    """One step from host pixels; its losses (total and each term, detached, not read: no sync)."""
    pixel_values = device_pixels(pixels, device)
    if mode.teacher_only:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model.teacher_features(pixel_values)
        return None
    output = forward(model, pixel_values, mode)
    if output.artifacts:
        FeatureDistillationTrainer.record_metrics(_logged, "train", output.artifacts)
    output.loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)  # the reference's teacher gradients too
    return {"total": output.loss.detach(), **{name: value.detach() for name, value in output.losses.items()}}


def _tokens(pair: Pair) -> int:
    return (pair.image_size // pair.patch_size) ** 2 + 1


def _block_flops(width: int, tokens: int) -> float:
    """One ViT block's forward (MLP ratio 4): qkv, out, fc1, fc2; QKᵀ and AV."""
    return 2 * tokens * (4 * width**2 + 2 * width * 4 * width) + 4 * tokens**2 * width


def _embed_flops(pair: Pair, width: int) -> float:
    return 2 * (_tokens(pair) - 1) * 3 * pair.patch_size**2 * width


def _student_blocks(pair: Pair, student: tuple[int, int, int]) -> int:
    """Blocks a student runs: up to its deepest distilled one."""
    return max(map_layers(list(pair.teacher_layers), pair.teacher[1], student[1])) + 1


def teacher_flops(pair: Pair) -> float:
    """One image's teacher forward up to the deepest distilled block: what students in one pass share."""
    return _embed_flops(pair, pair.teacher[0]) + (pair.teacher_layers[-1] + 1) * _block_flops(pair.teacher[0], _tokens(pair))


def student_flops(pair: Pair, student: tuple[int, int, int], method: str = "singer", rank: int = DistillationModelConfig.rank) -> float:
    """One image's work for one student beside the teacher forward: its forward and backward up to its
    deepest distilled block, and its method's: projectors; for SiNGER the rank-`rank` adapters and
    block l+1 forward and backward per intermediate layer; for ViTKD the generation projector and the
    generator's two 3×3 convolutions on the patch grid."""
    tokens, patches = _tokens(pair), _tokens(pair) - 1
    teacher_width, student_width = pair.teacher[0], student[0]
    layers = len(pair.teacher_layers)
    work = _embed_flops(pair, student_width) + _student_blocks(pair, student) * _block_flops(student_width, tokens)
    projector = 2 * tokens * student_width * teacher_width
    if method == "singer":
        work += layers * (projector + 2 * 2 * tokens * teacher_width * rank) + (layers - 1) * _block_flops(teacher_width, tokens)
    elif method == "fitnet":
        work += layers * projector
    elif method == "vitkd":
        work += (layers - 1) * projector + 2 * patches * student_width * teacher_width + 2 * 2 * 9 * patches * teacher_width**2
    else:
        raise ValueError(f"method: no FLOP count for {method!r}")
    return 3 * work  # backward as twice the forward


def step_flops(pair: Pair, batch_size: int, official: bool = False, teacher_only: bool = False) -> float:
    """FLOPs of one step's necessary work: teacher forward up to the deepest distilled
    block, block l+1 forward and backward per intermediate layer, student forward and backward up
    to its deepest distilled block, projectors and adapters. `official`: the reference's work instead,
    which also runs the teacher's and the student's later blocks, re-runs block l+1 on F^l and
    computes block l+1's weight gradients on both runs."""
    if teacher_only:
        return batch_size * teacher_flops(pair)
    flops = teacher_flops(pair) + student_flops(pair, pair.student)
    if official:
        tokens, (teacher_width, teacher_depth, _), (student_width, student_depth, _) = _tokens(pair), pair.teacher, pair.student
        flops += (teacher_depth - 1 - pair.teacher_layers[-1]) * _block_flops(teacher_width, tokens)
        flops += 3 * (len(pair.teacher_layers) - 1) * _block_flops(teacher_width, tokens)  # the re-run's forward, and two weight-gradient passes
        flops += (student_depth - _student_blocks(pair, pair.student)) * _block_flops(student_width, tokens)  # forward only: no loss reads them
    return batch_size * flops


class HostClock:
    """The host's wall clock: on a CPU the step runs while the host waits for it."""

    def mark(self) -> float:
        return time.perf_counter()

    def wait(self) -> None:
        pass

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaClock:
    """CUDA events on the current stream: a mark costs no synchronisation; `wait` once per timed window."""

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wait(self) -> None:
        torch.cuda.synchronize(self.device)

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1e3


def clock_for(device: torch.device) -> HostClock | CudaClock:
    return CudaClock(device) if device.type == "cuda" else HostClock()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Bytes of the device's memory allocated at most since the last reset; None on a CPU (not tracked)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


@dataclass
class Interleaved:
    seconds: dict[str, list[float]]
    """Each mode's step times, one per timed round."""
    peak_memory: dict[str, int | None]
    first_losses: dict[str, dict[str, float]]
    """Each training mode's losses at its first step: the initial weights, the same batch."""
    first_step_seconds: dict[str, float]
    """Each mode's first step, compilation included (host time, synchronised)."""
    rounds: int
    """Timed rounds done: fewer than asked when the deadline came first."""


def interleave(
    built: dict, pixels: torch.Tensor, device: torch.device, warmup: int, rounds: int, deadline: float | None = None, modes: dict[str, Mode] | None = None
) -> Interleaved:
    """`warmup` then `rounds` rounds of one step of every model in `built` in turn, each run as its
    `modes` entry (default: the mode of its name); after a timed round, stops when another as long would
    end past `deadline` (a `time.perf_counter()` value; at least one timed round). One synchronisation a round."""
    modes = modes or {name: MODES[name] for name in built}
    clock = clock_for(device)
    seconds: dict[str, list[float]] = {name: [] for name in built}
    peaks: dict[str, int | None] = dict.fromkeys(built)
    first: dict[str, dict[str, torch.Tensor]] = {}
    first_seconds: dict[str, float] = {}
    timed = 0
    for index in range(warmup + rounds):
        began, marks = time.perf_counter(), []
        for name, (model, optimizer) in built.items():
            reset_peak_memory(device)
            if index == 0:
                clock.wait()
                started = time.perf_counter()
            start = clock.mark()
            losses = train_step(model, optimizer, pixels, modes[name], device)
            marks.append((name, start, clock.mark()))
            if index == 0:
                clock.wait()
                first_seconds[name] = time.perf_counter() - started
            peak = peak_memory(device)
            peaks[name] = peak if peaks[name] is None else max(peaks[name], peak)
            if index == 0 and losses is not None:
                first[name] = losses
        clock.wait()
        if index >= warmup:
            timed += 1
            for name, start, end in marks:
                seconds[name].append(clock.seconds(start, end))
            if deadline is not None and 2 * time.perf_counter() - began > deadline:
                break
    first_losses = {name: {term: value.item() for term, value in losses.items()} for name, losses in first.items()}
    return Interleaved(seconds, peaks, first_losses, first_seconds, timed)


LOSS_TARGETS = {"total": 0.02, "term": 0.10}
"""Relative deviation from fp32's losses allowed: the total, and each term."""


def loss_deviations(first_losses: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each mode's losses as relative deviations from fp32's (same weights, same batch); {} without fp32."""
    if "fp32" not in first_losses:
        return {}
    base = first_losses["fp32"]
    return {
        name: {term: abs(value - base[term]) / (abs(base[term]) or 1.0) for term, value in losses.items()}
        for name, losses in first_losses.items()
        if name != "fp32"
    }


def losses_agree(deviation: dict[str, float]) -> bool:
    return deviation["total"] <= LOSS_TARGETS["total"] and all(v <= LOSS_TARGETS["term"] for k, v in deviation.items() if k != "total")


def agreement_lines(first_losses: dict[str, dict[str, float]]) -> list[str]:
    if "fp32" not in first_losses:
        return []
    base, deviations = first_losses["fp32"], loss_deviations(first_losses)
    lines = [f"losses at the initial weights, fp32: total {base['total']:.6g}, "
             + ", ".join(f"{k} {v:.6g}" for k, v in base.items() if k != "total")]  # fmt: skip
    for name, deviation in deviations.items():
        lines.append(
            f"  {name}: total {100 * deviation['total']:.3f}% off (target <= {100 * LOSS_TARGETS['total']:.0f}%), "
            + ", ".join(f"{k} {100 * v:.3f}%" for k, v in deviation.items() if k != "total")
            + f" (targets <= {100 * LOSS_TARGETS['term']:.0f}%): {'PASS' if losses_agree(deviation) else 'FAIL'}"
        )
    return lines


TARGETS = {"fp32": ("time", 0.8), "bf16": ("throughput", 3.0)}
"""Ours against the reference step: fp32 at most 0.8x its time, bf16 at least 3x its throughput."""


def reference_ratios(seconds: dict[str, list[float]]) -> dict[str, float]:
    """Each mode's step time over the reference's, the median of the per-round ratios."""
    return {
        name: statistics.median(t / r for t, r in zip(times, seconds["reference"]))
        for name, times in seconds.items()
        if name != "reference" and not MODES[name].teacher_only
    }


def meets_target(name: str, ratio: float) -> bool | None:
    """Whether a mode's ratio to the reference meets its target; None for modes without one."""
    if name not in TARGETS:
        return None
    kind, target = TARGETS[name]
    return ratio <= target if kind == "time" else 1 / ratio >= target


def group_flops(pair: Pair, group: tuple[Member, ...]) -> dict[str, float]:
    """One image's FLOPs of the `group` step (one teacher forward for all) and of each student's own step
    (`<student> alone`), named as `build_group` names the models."""
    alone = {f"student{index} alone": teacher_flops(pair) + student_flops(pair, member.shape(pair), member.method) for index, member in enumerate(group)}
    return {"group": teacher_flops(pair) + sum(flops - teacher_flops(pair) for flops in alone.values()), **alone}


def same_students(group: tuple[Member, ...]) -> bool:
    """Whether every student is the same size and method: then the group's step compares with one student's."""
    return len(set(group)) == 1


def separate_seconds(seconds: dict[str, list[float]]) -> list[float]:
    """Per round, the separate steps' times (every model's but the group's) summed."""
    return [sum(times) for times in zip(*(times for name, times in seconds.items() if name != "group"))]


def round_ratios(seconds: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per round, the group's step time over the separate steps' together (`separate`), over their mean
    (`one`: one student's step when the students are alike) and over each student's own step (`<student> alone`)."""
    group, together, count = seconds["group"], separate_seconds(seconds), len(seconds) - 1
    ratios = {"separate": [g / t for g, t in zip(group, together)], "one": [g * count / t for g, t in zip(group, together)]}
    return ratios | {name: [g / a for g, a in zip(group, times)] for name, times in seconds.items() if name != "group"}


def group_ratios(seconds: dict[str, list[float]]) -> dict[str, float]:
    """`round_ratios`' medians over the rounds."""
    return {name: statistics.median(ratios) for name, ratios in round_ratios(seconds).items()}


def flop_ratios(pair: Pair, group: tuple[Member, ...]) -> dict[str, float]:
    """What the FLOP count alone gives for each of `group_ratios`."""
    return group_ratios({name: [flops] for name, flops in group_flops(pair, group).items()})


LOSS_EQUALITY = 1e-6
"""Largest |group − alone| difference of a loss term, relative to its value, that counts as equal (float rounding)."""


def group_loss_differences(first_losses: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each student's largest |group − alone| over its loss terms and total (`absolute`, and `relative`
    to the term's value), from the first steps: the same initial weights, the same batch."""
    group, differences = first_losses["group"], {}
    for name, losses in first_losses.items():
        if name == "group":
            continue
        student = name.removesuffix(" alone")
        gaps = {term: abs(group[f"{student}/{term}"] - value) for term, value in losses.items()}
        differences[student] = {"absolute": max(gaps.values()), "relative": max(gap / (abs(losses[term]) or 1.0) for term, gap in gaps.items())}
    return differences


def losses_equal(differences: dict[str, dict[str, float]]) -> bool:
    return all(difference["relative"] <= LOSS_EQUALITY for difference in differences.values())


def host_syncs(model, optimizer, pixels, mode: Mode, device: torch.device) -> int:
    """Synchronising CUDA calls in one step (torch's sync debug mode): each one stalls the host."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(model, optimizer, pixels, mode, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if args.pair not in PAIRS:
        raise SystemExit(f"error: --pair must be one of {sorted(PAIRS)}, got {args.pair!r}")
    if args.students is not None and args.students not in GROUPS:
        raise SystemExit(f"error: --students must be one of {list(GROUPS)}, got {args.students!r}")
    modes = args.modes or (["fp32"] if args.students else ["reference", "fp32", "bf16"])
    if unknown := [mode for mode in modes if mode not in MODES]:
        raise SystemExit(f"error: --modes: unknown {unknown}; valid: {list(MODES)}")
    if args.students and (len(modes) != 1 or MODES[modes[0]].official or MODES[modes[0]].teacher_only):
        valid = [name for name, mode in MODES.items() if not (mode.official or mode.teacher_only)]
        raise SystemExit(f"error: --modes: with --students, give one of {valid}, got {modes}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device here; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, pair = torch.device(args.device), PAIRS[args.pair]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.artifact_stats:
        compare_artifact_stats(args, pair, (args.modes or ["fp32"])[0], device, where)
    elif args.students:
        compare_group(args, pair, modes[0], device, where)
    else:
        compare_modes(args, pair, modes, device, where)


def compare_modes(args: BenchmarkArguments, pair: Pair, modes: list[str], device: torch.device, where: str) -> None:
    pixels = host_pixels(pair, args.batch_size, device)
    built = {name: build(pair, MODES[name], device, args.seed) for name in modes}
    run = interleave(built, pixels, device, args.warmup, args.steps)
    times = run.seconds

    print(f"{args.pair}: teacher {pair.teacher}, student {pair.student} (width, blocks, heads), {pair.image_size}px, "
          f"patch {pair.patch_size}, layers {list(pair.teacher_layers)}, batch {args.batch_size}, {where}, "
          f"{args.steps} rounds after {args.warmup} warm-up; "
          f"{step_flops(pair, 1) / 1e9:.2f} GFLOP per image and step")  # fmt: skip
    print(f"{'mode':<14} {'ms/step':>9} {'min-max':>15} {'images/s':>9} {'TFLOP/s':>8} {'% of limit':>10} {'peak MiB':>9}")
    for name in modes:
        median = statistics.median(times[name])
        flops = step_flops(pair, args.batch_size, teacher_only=MODES[name].teacher_only)
        memory = f"{run.peak_memory[name] / 2**20:.0f}" if device.type == "cuda" else "-"
        print(
            f"{name:<14} {1e3 * median:9.1f} {1e3 * min(times[name]):7.1f}-{1e3 * max(times[name]):<7.1f} "
            f"{args.batch_size / median:9.1f} {flops / median / 1e12:8.3f} {100 * flops / median / 1e12 / args.peak_tflops:10.3f} {memory:>9}"
        )
    if device.type == "cuda":
        syncs = {name: host_syncs(*built[name], pixels, MODES[name], device) for name in modes}
        print("host syncs in one step: " + ", ".join(f"{name} {count}" for name, count in syncs.items()))
    if device.type == "cpu":
        print(f"peak resident memory of the process (all modes): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    flops = step_flops(pair, args.batch_size)
    print(f"limit: {args.peak_tflops:.0f} TFLOP/s = {args.peak_tflops * 1e12 / flops * args.batch_size:.0f} images/s for this pair")
    if "reference" in times:
        bound = flops / step_flops(pair, args.batch_size, official=True)
        print(f"per-round ratios to the reference step (median over rounds); FLOPs alone would give {bound:.3f}x:")
        for name, ratio in reference_ratios(times).items():
            verdict, met = "", meets_target(name, ratio)
            if met is not None:
                kind, target = TARGETS[name]
                verdict = f" (target {'<=' if kind == 'time' else '>='} {target}x {kind}: {'PASS' if met else 'FAIL'})"
            print(f"  {name}: {ratio:.3f}x the reference's time, {1 / ratio:.2f}x its throughput{verdict}")
    print("\n".join(agreement_lines(run.first_losses)))


ARTIFACT_STATS_TARGET = 1.02
"""The artifact statistics are on by default only if a step with them takes at most this many times one without."""


def compare_artifact_stats(args: BenchmarkArguments, pair: Pair, mode: str, device: torch.device, where: str) -> None:
    model, optimizer = build(pair, MODES[mode], device, args.seed)
    modes = {mode: MODES[mode], f"{mode} + artifact stats": dataclasses.replace(MODES[mode], artifact_stats=True)}
    built = dict.fromkeys(modes, (model, optimizer))
    run = interleave(built, host_pixels(pair, args.batch_size, device), device, args.warmup, args.steps, modes=modes)
    print(f"{args.pair}: teacher {pair.teacher}, student {pair.student} (width, blocks, heads), {pair.image_size}px, "
          f"patch {pair.patch_size}, layers {list(pair.teacher_layers)}, batch {args.batch_size}, {where}, "
          f"{run.rounds} rounds after {args.warmup} warm-up, one model stepped in both ways")  # fmt: skip
    for name, seconds in run.seconds.items():
        print(f"  {name:<28} {1e3 * statistics.median(seconds):9.1f} ms/step (min {1e3 * min(seconds):.1f}, max {1e3 * max(seconds):.1f})")
    without, with_stats = run.seconds.values()
    ratios = [b / a for a, b in zip(without, with_stats)]
    ratio = statistics.median(ratios)
    verdict = "PASS" if ratio <= ARTIFACT_STATS_TARGET else "FAIL"
    print(f"step with artifact statistics / without, per round (median over rounds): {ratio:.4f}x "
          f"(min {min(ratios):.4f}, max {max(ratios):.4f}); target <= {ARTIFACT_STATS_TARGET}x: {verdict}")  # fmt: skip
    # On a shared CPU the rounds' spread is other processes' load; each way's fastest step is the least disturbed.
    print(f"fastest step with / fastest without: {min(with_stats) / min(without):.4f}x")


GROUP_TARGET = 1.3
"""Alike students in one pass: at most this many times one student's step (on a teacher-dominated pair)."""


def compare_group(args: BenchmarkArguments, pair: Pair, mode: str, device: torch.device, where: str) -> None:
    group = GROUPS[args.students]
    built = build_group(pair, group, MODES[mode], device, args.seed)
    run = interleave(built, host_pixels(pair, args.batch_size, device), device, args.warmup, args.steps, modes=dict.fromkeys(built, MODES[mode]))
    flops = group_flops(pair, group)
    flops["separate"] = sum(value for name, value in flops.items() if name != "group")
    times = run.seconds | {"separate": separate_seconds(run.seconds)}

    students = ", ".join(f"student{index} {member.shape(pair)} {member.method}" for index, member in enumerate(group))
    print(f"{args.pair}: teacher {pair.teacher} (width, blocks, heads), {pair.image_size}px, patch {pair.patch_size}, "
          f"layers {list(pair.teacher_layers)}, batch {args.batch_size}, {where}, {mode}, {run.rounds} rounds after {args.warmup} warm-up")  # fmt: skip
    print(f"students '{args.students}' in one pass (one teacher forward, one optimiser, one backward) against each alone: {students}")
    print(f"{'step':<20} {'ms/step':>9} {'min-max':>17} {'GFLOP/image':>12} {'peak MiB':>9}")
    for name, seconds in times.items():
        memory = f"{run.peak_memory[name] / 2**20:.0f}" if device.type == "cuda" and name in run.peak_memory else "-"
        label = {"group": "group (one pass)", "separate": f"{len(group)} separate steps"}.get(name, name)
        print(f"{label:<20} {1e3 * statistics.median(seconds):9.1f} {1e3 * min(seconds):8.1f}-{1e3 * max(seconds):<8.1f} {flops[name] / 1e9:12.3f} {memory:>9}")
    rounds, bound = round_ratios(run.seconds), flop_ratios(pair, group)
    measured = {name: f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}; FLOPs {bound[name]:.3f}x" for name, ratios in rounds.items()}
    print("the group's time over, per round (median over rounds (min-max); what FLOPs alone would give):")
    print(f"  {len(group)} separate steps: {measured['separate']})")
    if same_students(group):
        verdict = "PASS" if statistics.median(rounds["one"]) <= GROUP_TARGET else "FAIL"
        print(f"  one student's step (the mean of the {len(group)} alone): {measured['one']}; target <= {GROUP_TARGET}x: {verdict})")
    for name in built:
        if name != "group":
            print(f"  {name}: {measured[name]})")
    differences = group_loss_differences(run.first_losses)
    print("losses at the initial weights, same batch, in the group and alone (largest |difference| over the terms and the total):")
    for student, difference in differences.items():
        print(f"  {student}: total {run.first_losses['group'][f'{student}/total']:.6g} and {run.first_losses[f'{student} alone']['total']:.6g}, "
              f"{difference['absolute']:.3g} apart")  # fmt: skip
    print(f"  equal (every term within {LOSS_EQUALITY:g} of its value): {'PASS' if losses_equal(differences) else 'FAIL'}")


if __name__ == "__main__":
    main(sys.argv[1:])
