#!/usr/bin/env python
"""Speed of one SiNGER training step, ours against the official code's, measured side by side.

    python benchmarks/step.py                                    # CPU default: ViT-S-width → ViT-Ti-width, 64px
    python benchmarks/step.py --pair vit-l-to-ti-224 --batch_size 128 --device cuda --modes reference bf16

A step is what the Trainer runs: teacher forward, adapters, the three losses, backward, a fused AdamW
step on the student, projectors and adapters (the Trainer's default optimiser). Models are built from
configs with random weights (speed does not depend on them), every mode from the same seed, so they
start from identical weights. Modes:

- `reference`: what the official code does (SPEC §7): the teacher's weights left trainable, so block
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
FLOPs are counted analytically (SPEC §11's convention: forward, and backward as twice the forward)
for the work the step needs, the same count for every mode; the reference does more.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import transformers
from transformers import HfArgumentParser

from singer_hf import DistillationConfig, DistillationModel, map_layers, resolve_vit
from singer_hf.architectures import BlockOutputs


@dataclass(frozen=True)
class Pair:
    teacher: tuple[int, int, int]
    """Teacher (width, blocks, heads); MLP ratio 4."""
    student: tuple[int, int, int]
    image_size: int
    patch_size: int
    teacher_layers: tuple[int, ...]


PAIRS = {
    # The CPU pair of issue 9: ViT-S width teacher, ViT-Ti width student, small images.
    "vit-s-to-ti-64": Pair((384, 12, 6), (192, 12, 3), 64, 8, (8, 11)),
    "vit-b-to-ti-224": Pair((768, 12, 12), (192, 12, 3), 224, 16, (8, 11)),
    # The paper's pair (SPEC §6, §11): ViT-L/16 → ViT-Ti/16 at 224.
    "vit-l-to-ti-224": Pair((1024, 24, 16), (192, 12, 3), 224, 16, (17, 23)),
}


@dataclass(frozen=True)
class Mode:
    official: bool
    autocast: bool
    teacher_bf16: bool
    compile: bool = False
    teacher_only: bool = False


MODES = {
    "reference": Mode(official=True, autocast=False, teacher_bf16=False),
    "fp32": Mode(official=False, autocast=False, teacher_bf16=False),
    "bf16-autocast": Mode(official=False, autocast=True, teacher_bf16=False),
    "bf16": Mode(official=False, autocast=True, teacher_bf16=True),
    "fp32-compiled": Mode(official=False, autocast=False, teacher_bf16=False, compile=True),
    "bf16-compiled": Mode(official=False, autocast=True, teacher_bf16=True, compile=True),
    "teacher-bf16": Mode(official=False, autocast=True, teacher_bf16=True, teacher_only=True),
}

SPEC_PEAK_TFLOPS = 989.0
"""Dense bf16 peak of an H100 SXM, SPEC §11's limit."""


@dataclass
class BenchmarkArguments:
    pair: str = field(default="vit-s-to-ti-64", metadata={"help": f"One of {sorted(PAIRS)}."})
    batch_size: int = field(default=16, metadata={"help": "Images per step."})
    modes: list[str] = field(
        default_factory=lambda: ["reference", "fp32", "bf16"], metadata={"help": f"Any of {list(MODES)}."}
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (CPU); default: torch's."})
    steps: int = field(default=10, metadata={"help": "Timed rounds (one step of every mode each)."})
    warmup: int = field(default=3, metadata={"help": "Untimed rounds first."})
    peak_tflops: float = field(default=SPEC_PEAK_TFLOPS, metadata={"help": "Peak the achieved TFLOP/s are a share of."})
    seed: int = 0


class OfficialCodeModel(DistillationModel):
    """`DistillationModel` with the official code's costs (SPEC §7): trainable teacher weights, block
    l+1 re-run on F^l instead of reading F^{l+1} from the teacher forward, and every student block run."""

    def __init__(self, teacher, student, config):
        super().__init__(teacher, student, config)
        self.teacher.requires_grad_(True)

    def teacher_features(self, pixel_values: torch.Tensor) -> BlockOutputs:
        teacher = resolve_vit(self.teacher)
        with torch.no_grad():
            outputs = teacher.block_outputs(pixel_values)
        features = list(outputs)
        for layer in self.teacher_layers[:-1]:
            features[layer + 1] = teacher.run_block(layer + 1, features[layer], outputs.block_kwargs)  # with weight gradients
        return BlockOutputs(features, outputs.block_kwargs)

    def student_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
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


def build(pair: Pair, mode: Mode, device: torch.device, seed: int):
    """The model and its optimiser; the teacher as loaded from a classification checkpoint (no
    pooler), the student as scripts/distill.py builds one from scratch."""
    torch.manual_seed(seed)
    teacher = transformers.ViTModel(vit_config(*pair.teacher, pair), add_pooling_layer=False)
    student = transformers.ViTModel(vit_config(*pair.student, pair))
    model_class = OfficialCodeModel if mode.official else DistillationModel
    model = model_class(teacher, student, DistillationConfig(teacher_layers=list(pair.teacher_layers))).to(device)
    if mode.teacher_bf16:
        model.cast_teacher(torch.bfloat16)
    if mode.compile:
        model.compile_blocks()
    model.train()
    # What the optimiser updates: student, projectors, adapters; never the teacher's own weights.
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and (not n.startswith("teacher.") or "singer_" in n)]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-4, fused=True)
    return model, optimizer


def forward(model, images, mode: Mode):
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=mode.autocast):
        return model(pixel_values=images)


def train_step(model, optimizer, images, mode: Mode) -> None:
    if mode.teacher_only:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            model.teacher_features(images)
        return
    forward(model, images, mode).loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)  # the reference's teacher gradients too


def step_flops(pair: Pair, batch_size: int, official: bool = False, teacher_only: bool = False) -> float:
    """FLOPs of one step's necessary work (SPEC §11): teacher forward up to the deepest distilled
    block, block l+1 forward and backward per intermediate layer, student forward and backward up
    to its deepest distilled block, projectors and adapters. `official`: the reference's work instead,
    which also runs the teacher's and the student's later blocks, re-runs block l+1 on F^l and
    computes block l+1's weight gradients on both runs."""
    tokens = (pair.image_size // pair.patch_size) ** 2 + 1
    pixels_per_patch = 3 * pair.patch_size**2

    def block(width: int) -> float:  # qkv, out, fc1, fc2; QKᵀ and AV
        return 2 * tokens * (4 * width**2 + 2 * width * 4 * width) + 4 * tokens**2 * width

    def embed(width: int) -> float:
        return 2 * (tokens - 1) * pixels_per_patch * width

    teacher_width, student_width = pair.teacher[0], pair.student[0]
    layers = len(pair.teacher_layers)
    student_blocks = max(map_layers(list(pair.teacher_layers), pair.teacher[1], pair.student[1])) + 1
    student = 3 * (embed(student_width) + student_blocks * block(student_width))
    teacher = embed(teacher_width) + (pair.teacher_layers[-1] + 1) * block(teacher_width)
    info = 3 * (layers - 1) * block(teacher_width)
    if teacher_only:
        return batch_size * teacher
    if official:
        teacher += (pair.teacher[1] - 1 - pair.teacher_layers[-1]) * block(teacher_width)
        info += 3 * (layers - 1) * block(teacher_width)  # the re-run's forward, and two weight-gradient passes
        student += (pair.student[1] - student_blocks) * block(student_width)  # forward only: no loss reads them
    heads = 3 * layers * (2 * tokens * student_width * teacher_width + 2 * 2 * tokens * teacher_width * 64)
    return batch_size * (teacher + info + student + heads)


def host_syncs(model, optimizer, images, mode: Mode) -> int:
    """Synchronising CUDA calls in one step (torch's sync debug mode): each one stalls the host."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(model, optimizer, images, mode)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_agreement(models, images, modes) -> list[str]:
    """Each mode's losses on the same batch at the same (initial) weights, against fp32's."""
    with torch.no_grad():
        outputs = {name: forward(models[name], images, MODES[name]) for name in modes if not MODES[name].teacher_only}
    if "fp32" not in outputs:
        return []
    base = outputs["fp32"]
    lines = [f"losses at the initial weights, fp32: total {base.loss.item():.6g}, "
             + ", ".join(f"{k} {v.item():.6g}" for k, v in base.losses.items())]  # fmt: skip
    for name, output in outputs.items():
        if name == "fp32":
            continue
        total = abs(output.loss.item() / base.loss.item() - 1)
        terms = {k: abs(v.item() / base.losses[k].item() - 1) for k, v in output.losses.items()}
        ok = total <= 0.02 and all(value <= 0.10 for value in terms.values())
        lines.append(
            f"  {name}: total {100 * total:.3f}% off (target <= 2%), "
            + ", ".join(f"{k} {100 * v:.3f}%" for k, v in terms.items())
            + f" (targets <= 10%): {'PASS' if ok else 'FAIL'}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if args.pair not in PAIRS:
        raise SystemExit(f"error: --pair must be one of {sorted(PAIRS)}, got {args.pair!r}")
    if unknown := [mode for mode in args.modes if mode not in MODES]:
        raise SystemExit(f"error: --modes: unknown {unknown}; valid: {list(MODES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device here; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, pair = torch.device(args.device), PAIRS[args.pair]
    images = torch.randn(args.batch_size, 3, pair.image_size, pair.image_size, generator=torch.Generator().manual_seed(1)).to(device)

    built = {name: build(pair, MODES[name], device, args.seed) for name in args.modes}
    models = {name: model for name, (model, _) in built.items()}
    agreement = loss_agreement(models, images, args.modes)

    times: dict[str, list[float]] = {name: [] for name in args.modes}
    peak_memory: dict[str, int] = dict.fromkeys(args.modes, 0)
    for round_index in range(args.warmup + args.steps):
        for name in args.modes:
            model, optimizer = built[name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            train_step(model, optimizer, images, MODES[name])
            synchronize(device)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak_memory[name] = max(peak_memory[name], torch.cuda.max_memory_allocated(device))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.pair}: teacher {pair.teacher}, student {pair.student} (width, blocks, heads), {pair.image_size}px, "
          f"patch {pair.patch_size}, layers {list(pair.teacher_layers)}, batch {args.batch_size}, {where}, "
          f"{args.steps} rounds after {args.warmup} warm-up; "
          f"{step_flops(pair, 1) / 1e9:.2f} GFLOP per image and step")  # fmt: skip
    print(f"{'mode':<14} {'ms/step':>9} {'min-max':>15} {'images/s':>9} {'TFLOP/s':>8} {'% of limit':>10} {'peak MiB':>9}")
    for name in args.modes:
        median = statistics.median(times[name])
        flops = step_flops(pair, args.batch_size, teacher_only=MODES[name].teacher_only)
        memory = f"{peak_memory[name] / 2**20:.0f}" if device.type == "cuda" else "-"
        print(
            f"{name:<14} {1e3 * median:9.1f} {1e3 * min(times[name]):7.1f}-{1e3 * max(times[name]):<7.1f} "
            f"{args.batch_size / median:9.1f} {flops / median / 1e12:8.3f} {100 * flops / median / 1e12 / args.peak_tflops:10.3f} {memory:>9}"
        )
    if device.type == "cuda":
        syncs = {name: host_syncs(*built[name], images, MODES[name]) for name in args.modes}
        print("host syncs in one step: " + ", ".join(f"{name} {count}" for name, count in syncs.items()))
    if device.type == "cpu":
        print(f"peak resident memory of the process (all modes): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    flops = step_flops(pair, args.batch_size)
    print(f"limit: {args.peak_tflops:.0f} TFLOP/s = {args.peak_tflops * 1e12 / flops * args.batch_size:.0f} images/s for this pair")
    if "reference" in times:
        bound = flops / step_flops(pair, args.batch_size, official=True)
        print(f"per-round ratios to the reference step (median over rounds); FLOPs alone would give {bound:.3f}x:")
        for name in args.modes:
            if name == "reference" or MODES[name].teacher_only:
                continue
            ratio = statistics.median(t / r for t, r in zip(times[name], times["reference"]))
            target = {"fp32": ("time", 0.8), "bf16": ("throughput", 3.0)}.get(name)
            verdict = ""
            if target and target[0] == "time":
                verdict = f" (target <= {target[1]}x time: {'PASS' if ratio <= target[1] else 'FAIL'})"
            elif target:
                verdict = f" (target >= {target[1]}x throughput: {'PASS' if 1 / ratio >= target[1] else 'FAIL'})"
            print(f"  {name}: {ratio:.3f}x the reference's time, {1 / ratio:.2f}x its throughput{verdict}")
    print("\n".join(agreement))


if __name__ == "__main__":
    main(sys.argv[1:])
