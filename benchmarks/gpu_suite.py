#!/usr/bin/env python
"""The GPU figures of docs/performance.md, measured by one command within a time budget.

    python benchmarks/gpu_suite.py --output_dir outputs/gpu          # ViT-L/16 → ViT-Ti/16 at 224, on a GPU
    python benchmarks/gpu_suite.py --pair tiny --device cpu --batch_size 4 --teacher_batch 8   # seconds, on a CPU

Writes `results.json` and `results.md` (a Markdown table) to `--output_dir`, after every part, so a run
cut short still leaves what it measured. The parts, in order, each given its share of the time left
when it starts (`--budget_s` counts from the start of the process, imports and compilation included):

1. `steps`: benchmarks/step.py's interleaved steps at `--batch_size`: the reference (official-like: fp32,
   teacher weights trainable, block l+1 re-run) against this project's step in fp32, bf16 and bf16 with
   regional compilation. images/s, ms/step, peak memory, TFLOP/s, the share of the GPU's dense bf16
   peak, the ratio to the reference, each mode's losses against fp32's on the same batch.
2. `students`: `--students` groups (three of the pair's student; a ViT-Ti/S/B-like family) trained in
   one pass (one teacher forward) against each student's own step, interleaved, at the steps' batch
   in `--students_mode` (bf16): the group's time over the separate steps', over one student's step,
   the FLOP count's bounds on both, and each student's losses in the group against alone (equal).
3. `teacher`: the teacher's forward alone in bf16 (eager, and compiled when that mode ran), at
   `--teacher_batch`: compare timm's published inference figures for ViT-L/16.
4. `data`: one DataLoader worker's rate (benchmarks/data.py's uint8 pipelines, briefly, or read from
   `--data_json`), hence the workers the fastest step rate needs.
5. `batch_search`: the largest batch the fastest mode fits, by doubling then bisection, an out-of-memory
   error caught and its memory freed; its images/s at each size tried.

A part stops when its share is spent (after at least one timed measurement) and says so in the JSON
(`status` cut, `reason`); a part that raises is recorded as failed and the next one runs; SIGTERM (a
wrapper's hard timeout) ends the run after writing what it has. The same code runs on a CPU (the test
suite runs it at `--pair tiny`): host clock instead of CUDA events, no memory figures, no pinning.
benchmarks/gpu_run.sh wraps it for a fresh GPU machine: install, run under a hard timeout, copy out.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # run as a script, the budget counts the imports below

import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import measure_rates, workers_needed  # noqa: E402
from step import (  # noqa: E402
    GROUPS,
    H100_PEAK_TFLOPS,
    MODES,
    PAIRS,
    Mode,
    build,
    build_group,
    clock_for,
    host_pixels,
    host_syncs,
    flop_ratios,
    group_flops,
    group_loss_differences,
    group_ratios,
    interleave,
    loss_deviations,
    losses_agree,
    losses_equal,
    peak_memory,
    reference_ratios,
    reset_peak_memory,
    round_ratios,
    same_students,
    separate_seconds,
    step_flops,
    train_step,
)

from singer_hf.cli import StrictArgumentParser, UsageError, run_cli  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) by device name, first match wins. NVIDIA quotes the data-centre
# parts "with sparsity", twice the dense figure; the GeForce parts' bf16 runs at the "FP32 accumulate" rate.
PEAK_BF16_TFLOPS = [
    (r"\bH100 PCIe\b", 756.0, "NVIDIA H100 datasheet, H100 PCIe: BF16 Tensor Core 1,513 TFLOPS with sparsity"),
    (r"\bH100 NVL\b", 835.5, "NVIDIA H100 datasheet, H100 NVL: BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"\bH100\b", H100_PEAK_TFLOPS, "NVIDIA H100 datasheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"\bH200 NVL\b", 835.5, "NVIDIA H200 datasheet, H200 NVL: BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"\bH200\b", H100_PEAK_TFLOPS, "NVIDIA H200 datasheet, H200 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity (the H100 SXM's)"),
    (r"\bA100\b", 312.0, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    (r"\bL40S\b", 362.05, "NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)"),
    (r"\bRTX 4090$", 165.2, "NVIDIA Ada GPU architecture whitepaper, RTX 4090: peak BF16 Tensor TFLOPS with FP32 accumulate 165.2 (330.4 with sparsity)"),
    (r"\bRTX 5090$", 209.5, "NVIDIA RTX Blackwell GPU architecture whitepaper, RTX 5090: peak FP16/BF16 Tensor TFLOPS with FP32 accumulate 209.5 (419 with sparsity)"),
]

SHARES = {"steps": 0.5, "students": 0.15, "teacher": 0.15, "data": 0.05, "batch_search": 0.3}
"""Each part's share of the time left when it starts, over the shares of the parts still to run."""

SOURCE_SIZE = [500, 375]
"""JPEGs the data part decodes: ImageNet's typical size."""


@dataclass
class SuiteArguments:
    output_dir: str = field(default="outputs/gpu", metadata={"help": "Where results.json and results.md go."})
    pair: str = field(default="vit-l-to-ti-224", metadata={"help": f"Teacher/student pair, one of {sorted(PAIRS)}."})
    device: str = field(default="cuda", metadata={"help": "cuda, cuda:N or cpu."})
    budget_s: float = field(default=480.0, metadata={"help": "Wall time for the whole run, from the process's start."})
    batch_size: int = field(default=128, metadata={"help": "Images per step for the interleaved modes."})
    modes: list[str] = field(
        default_factory=lambda: ["reference", "fp32", "bf16", "bf16-compiled"],
        metadata={"help": f"Training modes to interleave, any of {[m for m in MODES if not MODES[m].teacher_only]}."},
    )
    warmup: int = field(default=3, metadata={"help": "Untimed rounds first (compilation happens there)."})
    rounds: int = field(default=20, metadata={"help": "Timed rounds at most (one step of every mode each)."})
    students: list[str] = field(
        default_factory=lambda: ["same", "family"],
        metadata={"help": f"Groups of students the students part trains in one pass, each against its students' separate steps; any of {list(GROUPS)}."},
    )
    students_mode: str = field(default="bf16", metadata={"help": "The mode the students part runs in: a training mode other than the reference."})
    teacher_batch: int = field(default=1024, metadata={"help": "Images per teacher forward (timm's figures use 1024 and 2048); halved on OOM."})
    teacher_steps: int = field(default=10, metadata={"help": "Timed teacher forwards per row."})
    search_steps: int = field(default=3, metadata={"help": "Timed steps per batch size tried by the search."})
    max_batch: int | None = field(default=None, metadata={"help": "Largest batch the search tries; default: until out of memory on a GPU, 4x --batch_size on a CPU (no recoverable OOM there)."})
    data_json: str | None = field(default=None, metadata={"help": "benchmarks/data.py --output_json file to read the per-worker rates from, instead of measuring them."})
    data_images: int = field(default=128, metadata={"help": "JPEGs the data part decodes when it measures."})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend of the compiled modes."})
    compile_mode: str | None = field(default=None, metadata={"help": "torch.compile mode of the compiled modes."})
    peak_tflops: float | None = field(default=None, metadata={"help": "Dense bf16 peak to report shares of; default: looked up by the GPU's name."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; default: torch's."})
    seed: int = 0


def check(args: SuiteArguments) -> None:
    """Every argument checked before anything is built or measured; one line naming the argument."""
    if args.pair not in PAIRS:
        raise UsageError(f"--pair: must be one of {sorted(PAIRS)}, got {args.pair!r}")
    training = [name for name in MODES if not MODES[name].teacher_only]
    if not args.modes or any(mode not in training for mode in args.modes):
        raise UsageError(f"--modes: give some of {training}, got {args.modes}")
    if not args.students or any(group not in GROUPS for group in args.students):
        raise UsageError(f"--students: give some of {list(GROUPS)}, got {args.students}")
    if args.students_mode not in training or MODES[args.students_mode].official:
        raise UsageError(f"--students_mode: must be one of {[name for name in training if not MODES[name].official]}, got {args.students_mode!r}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise UsageError(f"--device: must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device here; on a CPU use --device cpu (and --pair tiny for a quick run)")
    for name in ("batch_size", "rounds", "teacher_batch", "teacher_steps", "search_steps", "data_images"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name}: must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.budget_s < 0:
        raise UsageError(f"--{'warmup' if args.warmup < 0 else 'budget_s'}: must not be negative")
    if args.max_batch is not None and args.max_batch < args.batch_size:
        raise UsageError(f"--max_batch: must be at least --batch_size ({args.batch_size}), got {args.max_batch}")
    if args.data_json is not None and not Path(args.data_json).is_file():
        raise UsageError(f"--data_json: {args.data_json} does not exist (write one with: python benchmarks/data.py --output_json FILE)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UsageError(f"--peak_tflops: must be positive, got {args.peak_tflops}")


def known_peak(name: str) -> tuple[float | None, str]:
    """(dense bf16 TFLOP/s, the vendor figure it comes from) for a GPU name; (None, 'peak unknown') otherwise."""
    for pattern, tflops, source in PEAK_BF16_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return tflops, source
    return None, "peak unknown"


def describe_device(device: torch.device, peak_override: float | None) -> dict:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        described = {"type": "cuda", "name": name, "memory_gib": round(properties.total_memory / 2**30, 1),
                     "capability": f"{properties.major}.{properties.minor}", "cuda": torch.version.cuda}  # fmt: skip
        peak, source = known_peak(name)
    else:
        name = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor() or "CPU")
        described = {"type": "cpu", "name": name, "threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability()}
        peak, source = None, "peak unknown (a CPU: no tensor-core peak)"
    if peak_override is not None:
        peak, source = peak_override, "given by --peak_tflops"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    return {**described, "peak_bf16_tflops": peak, "peak_source": source, "versions": versions}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


class Terminated(BaseException):
    """SIGTERM arrived (a hard timeout): stop measuring, keep what was measured."""


def _on_sigterm(signum, frame):
    raise Terminated(f"stopped by signal {signum} (a hard timeout?)")


class Suite:
    """The run's state: arguments, models built so far, results, and where they are written."""

    def __init__(self, args: SuiteArguments, argv: list[str], started: float):
        self.args, self.started = args, started
        self.device = torch.device(args.device)
        self.pair = PAIRS[args.pair]
        self.output_dir = Path(args.output_dir)
        self.deadline = started + args.budget_s
        self.built: dict[str, tuple] = {}
        self.compile_options = {"backend": args.compile_backend, **({"mode": args.compile_mode} if args.compile_mode else {})}
        device = describe_device(self.device, args.peak_tflops)
        self.peak = device["peak_bf16_tflops"]
        pair = self.pair
        self.results = {
            "command": " ".join(["python", "benchmarks/gpu_suite.py", *_without_paths(argv)]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "budget_s": args.budget_s,
            "elapsed_s": None,
            "device": device,
            "pair": {"name": args.pair, "teacher": pair.teacher, "student": pair.student, "image_size": pair.image_size,
                     "patch_size": pair.patch_size, "teacher_layers": pair.teacher_layers,
                     "gflop_per_image_step": step_flops(pair, 1) / 1e9, "gflop_per_image_teacher": step_flops(pair, 1, teacher_only=True) / 1e9},  # fmt: skip
            "settings": {**{k: v for k, v in asdict(args).items() if k != "output_dir"},
                         "data_json": args.data_json and Path(args.data_json).name,
                         "tf32_matmul": torch.backends.cuda.matmul.allow_tf32},  # fmt: skip
            "parts": {name: {"status": "pending"} for name in SHARES},
        }

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f} s] {message}", flush=True)

    def model(self, name: str):
        if name not in self.built:
            self.log(f"building {name}")
            self.built[name] = build(self.pair, MODES[name], self.device, self.args.seed, self.compile_options)
        return self.built[name]

    def keep_only(self, names: set[str]) -> None:
        """Frees the other modes' models (the search wants the device's memory for one)."""
        for name in [name for name in self.built if name not in names]:
            del self.built[name]
        free_memory(self.device)

    def figures(self, batch: int, seconds: float, flops: float, memory: int | None) -> dict:
        """A timed step (or forward) as the JSON reports it."""
        tflops = flops / seconds / 1e12
        return {"batch_size": batch, "ms_per_step": 1e3 * seconds, "images_per_s": batch / seconds, "tflops": tflops,
                "peak_share": None if self.peak is None else tflops / self.peak,
                "peak_memory_mib": None if memory is None else memory / 2**20}  # fmt: skip

    def timed(self, name: str, batch: int, steps: int, mode=None, warmup: int = 2) -> dict | None:
        """`steps` steps of mode `name`'s model at `batch` (run as `mode`, default `name`'s: the teacher-only
        mode times its teacher alone) between two clock marks, after `warmup`; None when the device runs
        out of memory (then its memory is freed)."""
        model, optimizer = self.model(name)
        mode, clock = mode or MODES[name], clock_for(self.device)
        pixels = host_pixels(self.pair, batch, self.device)
        out_of_memory = False
        try:
            reset_peak_memory(self.device)
            for _ in range(warmup):
                train_step(model, optimizer, pixels, mode, self.device)
            start = clock.mark()
            for _ in range(steps):
                train_step(model, optimizer, pixels, mode, self.device)
            end = clock.mark()
            clock.wait()
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not out_of_memory_error(error):
                raise
            out_of_memory = True  # freed below, once the exception no longer holds the step's frames
        if out_of_memory:
            model.zero_grad(set_to_none=True)
            del pixels
            free_memory(self.device)
            return None
        flops = step_flops(self.pair, batch, teacher_only=mode.teacher_only)
        return self.figures(batch, clock.seconds(start, end) / steps, flops, peak_memory(self.device))

    def fastest_mode(self) -> str | None:
        """The training mode with the most images/s in the interleaved steps; None before they ran."""
        modes = self.results["parts"]["steps"].get("modes", {})
        return max(modes, key=lambda name: modes[name]["images_per_s"], default=None)

    def write(self) -> None:
        self.results["elapsed_s"] = time.perf_counter() - self.started
        self.results["compiler"] = dict(torch._dynamo.utils.counters["stats"])  # graphs compiled, frames seen
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name, text in (("results.json", json.dumps(self.results, indent=2) + "\n"), ("results.md", render_markdown(self.results))):
            temporary = self.output_dir / f".{name}.tmp"
            temporary.write_text(text, encoding="utf-8")
            temporary.replace(self.output_dir / name)


def _without_paths(argv: list[str]) -> list[str]:
    """The command line as reported: local paths (`--output_dir`, `--data_json`) cut to their last part."""
    return [Path(token).name if index and argv[index - 1] in ("--output_dir", "--data_json") else token for index, token in enumerate(argv)]


def out_of_memory_error(error: RuntimeError) -> bool:
    """The allocator's out-of-memory error, or a library's failed allocation near the limit (cuBLAS, cuDNN)."""
    return isinstance(error, torch.OutOfMemoryError) or any(text in str(error) for text in ("out of memory", "ALLOC_FAILED"))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def interleave_fitting(suite: Suite, label: str, build_all: Callable[[], dict], batch: int, deadline: float, record: dict, mode: Mode | None = None):
    """(`interleave` of the models `build_all()` returns, the batch it ran at, the models, the pixels): at
    `batch`, halved (the models built again: the losses compare initial weights) while the device runs out
    of memory, the sizes that did not fit listed in `record["out_of_memory_at"]`. `mode`: how every model
    runs (default: the mode of its name)."""
    args = suite.args
    while True:
        built = build_all()
        suite.log(f"{label}: {args.warmup} warm-up + up to {args.rounds} timed rounds of {list(built)} at batch {batch}")
        pixels = host_pixels(suite.pair, batch, suite.device)
        try:
            modes = None if mode is None else dict.fromkeys(built, mode)
            return interleave(built, pixels, suite.device, args.warmup, args.rounds, deadline, modes), batch, built, pixels
        except RuntimeError as error:
            if batch == 1 or not out_of_memory_error(error):
                raise
        del built, pixels  # out of memory: freed here, where the exception no longer holds the step's frames
        suite.keep_only(set())
        record.setdefault("out_of_memory_at", []).append(batch)
        batch //= 2
        suite.log(f"{label}: out of memory; halving the batch to {batch}")


def run_steps(suite: Suite, deadline: float) -> str | None:
    """The interleaved modes at `--batch_size`, halved while the device runs out of memory."""
    args, part = suite.args, suite.results["parts"]["steps"]
    run, batch, built, pixels = interleave_fitting(suite, "steps", lambda: {name: suite.model(name) for name in args.modes}, args.batch_size, deadline, part)
    flops = step_flops(suite.pair, batch)
    ratios = reference_ratios(run.seconds) if "reference" in run.seconds else {}
    deviations = loss_deviations(run.first_losses)
    modes = {}
    for name, seconds in run.seconds.items():
        median = statistics.median(seconds)
        modes[name] = {**suite.figures(batch, median, flops, run.peak_memory[name]),
                       "min_ms": 1e3 * min(seconds), "max_ms": 1e3 * max(seconds), "first_step_s": run.first_step_seconds[name],
                       "time_vs_reference": ratios.get(name), "losses": run.first_losses.get(name),
                       "loss_deviation": deviations.get(name),
                       "losses_agree": losses_agree(deviations[name]) if name in deviations else None}  # fmt: skip
    part.update(batch_size=batch, rounds=run.rounds, warmup=args.warmup, modes=modes,
                flop_bound=flops / step_flops(suite.pair, batch, official=True))  # fmt: skip
    if suite.device.type == "cuda":
        part["host_syncs"] = {name: host_syncs(*built[name], pixels, MODES[name], suite.device) for name in built}
    return None if run.rounds == args.rounds else f"time share spent after {run.rounds} of {args.rounds} timed rounds"


def run_students(suite: Suite, deadline: float) -> str | None:
    """Each group of `--students` trained in one pass against its students' separate steps, interleaved, at
    the steps' batch, in `--students_mode`; a group starts only before the part's deadline."""
    args, part = suite.args, suite.results["parts"]["students"]
    mode = MODES[args.students_mode]
    batch = suite.results["parts"]["steps"].get("batch_size", args.batch_size)
    groups = part.setdefault("groups", {})
    part.update(mode=args.students_mode, warmup=args.warmup)
    for name in args.students:
        if groups and time.perf_counter() >= deadline:
            return f"time share spent before the group {name}"
        group, record = GROUPS[name], groups.setdefault(name, {})
        record["students"] = [{"name": f"student{index}", "shape": member.shape(suite.pair), "method": member.method} for index, member in enumerate(group)]

        def build_all():
            return build_group(suite.pair, group, mode, suite.device, args.seed, suite.compile_options)

        run, size, built, _ = interleave_fitting(suite, f"students {name}", build_all, batch, deadline, record, mode)
        flops = group_flops(suite.pair, group)
        rows = {key: suite.figures(size, statistics.median(seconds), size * flops[key], run.peak_memory[key]) for key, seconds in run.seconds.items()}
        memories = [memory for key, memory in run.peak_memory.items() if key != "group"]
        rows["separate"] = suite.figures(size, statistics.median(separate_seconds(run.seconds)), size * (sum(flops.values()) - flops["group"]),
                                         None if None in memories else max(memories))  # fmt: skip
        differences = group_loss_differences(run.first_losses)
        spread = {key: [min(ratios), max(ratios)] for key, ratios in round_ratios(run.seconds).items()}
        record.update(batch_size=size, rounds=run.rounds, same_students=same_students(group), rows=rows,
                      time_ratios=group_ratios(run.seconds), time_ratio_ranges=spread, flop_ratios=flop_ratios(suite.pair, group),
                      losses={student: {"group": run.first_losses["group"][f"{student}/total"], "alone": run.first_losses[f"{student} alone"]["total"]}
                              for student in differences},
                      loss_differences=differences, losses_equal=losses_equal(differences))  # fmt: skip
        ratios = record["time_ratios"]
        suite.log(f"students {name}: the group's step {ratios['separate']:.3f}x its {len(group)} separate steps' time, losses {'equal' if record['losses_equal'] else 'DIFFERENT'}")
        del built
        free_memory(suite.device)
        suite.write()
        if run.rounds < args.rounds:
            return f"time share spent after {run.rounds} of {args.rounds} timed rounds of the group {name}"
    return None


def run_teacher(suite: Suite, deadline: float) -> str | None:
    """The bf16 mode's teacher (eager; compiled too when that mode ran), its forward alone."""
    args, part = suite.args, suite.results["parts"]["teacher"]
    rows = part.setdefault("rows", {})
    variants = {"eager": "bf16" if "bf16" in suite.built else "teacher-bf16"}
    if "bf16-compiled" in suite.built:
        variants["compiled"] = "bf16-compiled"
    for label, name in variants.items():
        if rows and time.perf_counter() >= deadline:
            return f"time share spent before the {label} row"
        batch = args.teacher_batch
        while (result := suite.timed(name, batch, args.teacher_steps, MODES["teacher-bf16"])) is None and batch > 1:
            suite.log(f"teacher: out of memory at batch {batch}; halving")
            batch //= 2
        if result is not None:
            rows[label] = result
            suite.log(f"teacher {label}: {result['images_per_s']:.0f} images/s at batch {batch}")
    return None


def run_data(suite: Suite, deadline: float) -> str | None:
    args, part = suite.args, suite.results["parts"]["data"]
    if args.data_json:
        rates = json.loads(Path(args.data_json).read_text(encoding="utf-8"))["per_worker"]
        part["source"] = f"read from {Path(args.data_json).name}"
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a DataLoader worker's
        try:
            rates = measure_rates(args.data_images, SOURCE_SIZE, suite.pair.image_size, 1, outputs=("uint8",), report=lambda line: suite.log(f"data: {line.strip()}"))
        finally:
            torch.set_num_threads(threads)
        part["source"] = f"measured here: {args.data_images} JPEGs of {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]}, one process, 1 thread"
    part["per_worker"] = {name: rate for name, rate in rates.items() if name.endswith("uint8")}
    return None


def largest_batch(fits: Callable[[int], bool], start: int, cap: int, deadline: float) -> tuple[int, int | None, str | None]:
    """(largest size that fit, smallest that did not or None, why it stopped early or None): doubling from
    `start` until a size does not fit or `cap` is reached, then bisection to within an eighth (multiples of
    8 once above 8). After the first, a size is tried only if its time, estimated from the last try's
    scaled by size, ends before `deadline`."""
    low, high, size, last = 0, None, min(start, cap), None

    def attempt(size: int) -> bool:
        nonlocal last
        began = time.perf_counter()
        fitted = fits(size)
        last = (size, time.perf_counter() - began)
        return fitted

    def too_late(size: int) -> bool:
        return time.perf_counter() + last[1] * size / last[0] > deadline

    while True:
        if attempt(size):
            low = size
        else:
            high = size
            break
        if size >= cap:
            return low, None, None
        size = min(2 * size, cap)
        if too_late(size):
            return low, None, f"time share spent: batch {size} would end past it (largest tried {low})"
    while high - low > max(8, low // 8):
        size = (low + high) // 2
        size -= size % 8 if size > 8 else 0
        if not low < size < high:
            break
        if too_late(size):
            return low, high, f"time share spent: batch {size} would end past it (between {low} and {high})"
        if attempt(size):
            low = size
        else:
            high = size
    return low, high, None


def run_batch_search(suite: Suite, deadline: float) -> str | None:
    args, part = suite.args, suite.results["parts"]["batch_search"]
    name = suite.fastest_mode() or args.modes[-1]
    suite.keep_only({name})
    cap = args.max_batch or (65536 if suite.device.type == "cuda" else 4 * args.batch_size)
    part.update(mode=name, cap=cap, trials=[])

    def fits(batch: int) -> bool:
        suite.log(f"batch search: {name} at batch {batch}")
        result = suite.timed(name, batch, args.search_steps)
        part["trials"].append({"batch_size": batch, "fits": False} if result is None else {**result, "fits": True})
        suite.write()
        return result is not None

    low, high, cut = largest_batch(fits, suite.results["parts"]["steps"].get("batch_size", args.batch_size), cap, deadline)
    part.update(largest_fitting=low or None, smallest_failing=high)
    return cut


PARTS = {"steps": run_steps, "students": run_students, "teacher": run_teacher, "data": run_data, "batch_search": run_batch_search}


def part_deadline(now: float, end: float, name: str, to_run: list[str]) -> float:
    """When part `name` must stop: its share of the time left before `end`, over the shares of `to_run`
    (itself and the parts after it), so time a part leaves unused goes to the later ones."""
    return now + max(end - now, 0.0) * SHARES[name] / sum(SHARES[part] for part in to_run)


def run_parts(suite: Suite) -> None:
    parts = suite.results["parts"]
    names = list(PARTS)
    for index, name in enumerate(names):
        started = time.perf_counter()
        if started >= suite.deadline and name != "steps":  # the steps are the point: they always get their first round
            parts[name] = {"status": "skipped", "reason": "budget spent before this part"}
            suite.write()
            continue
        deadline = part_deadline(started, suite.deadline, name, names[index:])
        suite.log(f"{name}: {deadline - started:.0f} s of the {max(suite.deadline - started, 0):.0f} s left")
        try:
            cut = PARTS[name](suite, deadline)
            parts[name].update(status="cut" if cut else "done", reason=cut)
        except Terminated as stop:
            parts[name].update(status="cut", reason=str(stop))
            for later in names[index + 1 :]:
                parts[later] = {"status": "skipped", "reason": str(stop)}
            raise
        except Exception as error:  # noqa: BLE001 - one part's failure must not lose the others' figures
            message = " ".join(str(error).split()) or type(error).__name__
            parts[name].update(status="failed", reason=f"{type(error).__name__}: {message}", traceback=traceback.format_exc())
            suite.log(f"{name} failed: {type(error).__name__}: {message}")
        finally:
            parts[name]["seconds"] = time.perf_counter() - started
            suite.write()


def main(argv: list[str] | None = None, started: float | None = None) -> dict:
    """The suite; `--budget_s` counts from `started` (the process's start when run as a script), else from now."""
    started = time.perf_counter() if started is None else started
    argv = sys.argv[1:] if argv is None else argv
    (args,) = StrictArgumentParser(SuiteArguments).parse(argv)
    check(args)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    handler = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        suite = Suite(args, argv, started)
        suite.write()
        suite.log(f"{suite.results['device']['name']}: {args.pair}, budget {args.budget_s:.0f} s; writing {suite.output_dir}")
        try:
            run_parts(suite)
        except Terminated as stop:
            raise SystemExit(f"error: {stop}; what was measured is in {suite.output_dir}") from None
        finally:
            suite.write()
            print(render_markdown(suite.results), flush=True)
        return suite.results
    finally:
        torch.set_num_threads(threads)
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _students(students: list[dict]) -> str:
    """"3 × width 192 singer", or each student's width and method when they differ."""
    described = [f"width {student['shape'][0]} {student['method']}" for student in students]
    return f"{len(described)} × {described[0]}" if len(set(described)) == 1 else ", ".join(described)


def render_markdown(results: dict) -> str:
    """The results as a Markdown table and a few lines; from the JSON alone."""
    device, pair, parts = results["device"], results["pair"], results["parts"]
    on_cpu = device["type"] == "cpu"
    where = f"CPU: {device['name']}, {device['threads']} threads" if on_cpu else f"{device['name']} ({device['memory_gib']} GiB)"
    peak = device["peak_bf16_tflops"]
    lines = [
        f"## {pair['name']} on {where}",
        "",
        f"{results['date']}; torch {device['versions']['torch']}, transformers {device['versions']['transformers']}; "
        f"{pair['gflop_per_image_step']:.3g} GFLOP per image and step, {pair['gflop_per_image_teacher']:.3g} per teacher forward; "
        + (f"shares of a dense bf16 peak of {peak:g} TFLOP/s ({device['peak_source']})." if peak else f"{device['peak_source']}.")
        + f" `{results['command']}`, {_number(results['elapsed_s'], 0)} s of a {results['budget_s']:g} s budget.",
        "",
        "| measured | batch | images/s | ms/step | peak memory MiB | TFLOP/s | % of bf16 peak | throughput × reference | losses vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, figures: dict, versus: float | None = None, losses: str = "-") -> str:
        share = "peak unknown" if figures["peak_share"] is None else f"{100 * figures['peak_share']:.1f}"
        return (f"| {label} | {figures['batch_size']} | {_number(figures['images_per_s'])} | {_number(figures['ms_per_step'])} | "
                f"{_number(figures['peak_memory_mib'], 0)} | {_number(figures['tflops'], 2)} | {share} | "
                f"{'-' if versus is None else f'{1 / versus:.2f}×'} | {losses} |")  # fmt: skip

    labels = {"reference": "reference step (official-like, fp32)", "fp32": "this step, fp32", "bf16": "this step, bf16",
              "bf16-compiled": "this step, bf16, blocks compiled", "fp32-compiled": "this step, fp32, blocks compiled",
              "bf16-autocast": "this step, bf16 autocast (fp32 teacher weights)"}  # fmt: skip
    for name, figures in parts["steps"].get("modes", {}).items():
        deviation = figures["loss_deviation"]
        losses = "-" if deviation is None else (
            f"total {100 * deviation['total']:.3f} %, worst term {100 * max(v for k, v in deviation.items() if k != 'total'):.2f} % "
            f"({'PASS' if figures['losses_agree'] else 'FAIL'})")  # fmt: skip
        lines.append(row(labels.get(name, name), figures, figures["time_vs_reference"], losses))
    students = parts["students"]
    for name, record in students.get("groups", {}).items():
        if "rows" in record:
            count, mode = len(record["students"]), labels.get(students["mode"], students["mode"]).removeprefix("this step, ")
            lines.append(row(f"{count} students in one pass ({name}: {_students(record['students'])}), {mode}", record["rows"]["group"]))
            lines.append(row(f"the same {count} students, {count} separate steps, {mode}", record["rows"]["separate"]))
    search = parts["batch_search"]
    fitting = [trial for trial in search.get("trials", []) if trial["fits"]]
    if fitting:
        largest = max(fitting, key=lambda trial: trial["batch_size"])
        if search.get("smallest_failing") is not None:
            bound = "largest that fits"
        else:
            bound = "largest tried (the search's cap)" if largest["batch_size"] >= search["cap"] else "largest tried (search cut short)"
        lines.append(row(f"{labels.get(search['mode'], search['mode'])}, {bound}", largest))
        best = max(fitting, key=lambda trial: trial["images_per_s"])
        if best is not largest:
            lines.append(row(f"{labels.get(search['mode'], search['mode'])}, fastest batch tried", best))
    for label, figures in parts["teacher"].get("rows", {}).items():
        lines.append(row(f"teacher forward alone, bf16, {label}", figures))
    lines.append("")

    per_worker = parts["data"].get("per_worker")
    rates = [row["images_per_s"] for row in parts["steps"].get("modes", {}).values()]
    rates += [trial["images_per_s"] for trial in fitting]
    if per_worker and rates:
        needed = ", ".join(f"{name} {count}" for name, count in workers_needed(max(rates), per_worker).items())
        worker = ", ".join(f"{name} {row['images_per_s']:.0f}" for name, row in per_worker.items())
        lines.append(f"- DataLoader workers for the fastest step rate above ({max(rates):,.0f} images/s): {needed} "
                     f"(one worker: {worker} images/s; {parts['data']['source']}).")  # fmt: skip
    if (steps := parts["steps"]).get("modes"):
        compiled = ", ".join(f"{name} {row['first_step_s']:.1f} s" for name, row in steps["modes"].items())
        halved = f" (out of memory at batch {', '.join(map(str, steps['out_of_memory_at']))} first)" if "out_of_memory_at" in steps else ""
        lines.append(f"- Interleaved: {steps['rounds']} timed rounds after {steps['warmup']} warm-up{halved}; first step (compilation included): {compiled}. "
                     f"The FLOP count alone bounds ours/reference time at {steps['flop_bound']:.3f}.")  # fmt: skip
    if groups := [(name, record) for name, record in students.get("groups", {}).items() if "rows" in record]:
        described = []
        for name, record in groups:
            measured, bound, count = record["time_ratios"], record["flop_ratios"], len(record["students"])
            low, high = record["time_ratio_ranges"]["separate"]
            text = f"{name}: the group's step {measured['separate']:.3f}× its {count} separate steps' time ({low:.3f}–{high:.3f} over the rounds; FLOP count {bound['separate']:.3f}×)"
            if record["same_students"]:
                text += f", {measured['one']:.3f}× one student's step ({bound['one']:.3f}×)"
            worst = max(difference["absolute"] for difference in record["loss_differences"].values())
            text += f"; losses in the group and alone {'equal' if record['losses_equal'] else 'DIFFERENT'} (largest difference {worst:.3g})"
            described.append(text + f", {record['rounds']} timed rounds at batch {record['batch_size']}")
        lines.append(f"- Students in one pass ({students['mode']}; one teacher forward for all): " + "; ".join(described) + ".")
    if trials := search.get("trials"):
        tried = ", ".join(f"{trial['batch_size']}{'' if trial['fits'] else ' (out of memory)'}" for trial in trials)
        lines.append(f"- Batch search ({search['mode']}): tried {tried}.")
    status = "; ".join(
        f"{name} {part['status']}" + (f" ({part['reason']})" if part.get("reason") else "") + (f", {part['seconds']:.0f} s" if "seconds" in part else "")
        for name, part in parts.items()
    )  # fmt: skip
    lines += [f"- Parts: {status}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(functools.partial(main, started=STARTED))
