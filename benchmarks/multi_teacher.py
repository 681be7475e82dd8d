#!/usr/bin/env python
"""Two genuinely different teachers, one student: does the student learn what each teacher knows?

    python benchmarks/multi_teacher.py                      # the study (3 seeds)
    python benchmarks/multi_teacher.py --seeds 1 --student_steps 20 --teacher_steps 20 --probe_images 500 \
        --train_images 2000 --output_dir outputs/multi-teacher-smoke   # a smoke run

Several processes may share one `output_dir` (start them together): each teacher and each run is
trained by the process that claims it first (`<name>.claimed`), and the last to finish writes the
tables.

Fashion-MNIST (28 px). Two teachers, built here and kept in `output_dir`:

- *labels*: a ViT (6 blocks, width 96, 4 px patches, 28 px, Fashion-MNIST's mean/std) trained on the
  10 classes;
- *rotation*: a ViT (4 blocks, width 128, 4 px patches, 32 px, mean/std 0.5) trained to tell which
  of 0/90/180/270° an image was rotated by (a self-supervised objective), with its own image
  statistics and size: the students' batch reaches it re-normalised and resized on the device
  (`TeacherSettings.image_mean/std/size`), on another patch grid (8×8 vs the student's 7×7).

Students (4 blocks, width 64, from scratch, the same schedule each), per seed: from the labels
teacher alone, from the rotation teacher alone, from both (SiNGER and FitNet, each with and without
PHI-S target normalisation), plus the untrained student (the floor). Each student and
teacher is probed linearly (the demo's L-BFGS probe on the last block's CLS token and mean patch
token, concatenated) on both tasks: the 10 classes and the rotation (test images rotated by a
random multiple of 90°). Mean ± std over the seeds.

Writes `multi_teacher.json` and `multi_teacher.md` to `output_dir`; each run's result is kept in
`runs/<name>.json`, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification, ViTModel, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the register-neuron planting
from register_neurons import blank_patches, finetune_after, plant_register_neurons  # noqa: E402

from singer_hf import DistillationModel, DistillationModelConfig, TeacherSettings, resolve_vit  # noqa: E402
from singer_hf.cli import StrictArgumentParser, run_cli  # noqa: E402
from singer_hf.demo.fashion_mnist import load_fashion_mnist  # noqa: E402
from singer_hf.demo.probe import linear_probe_accuracy  # noqa: E402
from singer_hf.diagnostics import artifact_stats  # noqa: E402

FASHION_STATS = ([0.2860] * 3, [0.3530] * 3)
ROTATION_STATS = ([0.5] * 3, [0.5] * 3)
TEACHERS = {
    "labels": dict(layers=6, width=96, image_size=28, stats=FASHION_STATS, classes=10),
    "rotation": dict(layers=4, width=128, image_size=32, stats=ROTATION_STATS, classes=4),
    # The labels teacher with high-norm artifact tokens planted (register neurons in block 2, as in the
    # evidence study: 2.5 % of the patch tokens, 8× the median norm), blocks 3–5 then fine-tuned on the labels.
    "labels-artifact": dict(layers=6, width=96, image_size=28, stats=FASHION_STATS, classes=10, derived_from="labels"),
}
PLANT_BLOCK, FINETUNE_STEPS = 2, 150
STUDENTS = {
    "labels-singer": ("labels teacher alone, SiNGER", {"labels": "none"}, "singer"),
    "rotation-singer": ("rotation teacher alone, SiNGER", {"rotation": "none"}, "singer"),
    "both-singer": ("both, SiNGER, no normalisation", {"labels": "none", "rotation": "none"}, "singer"),
    "both-singer-phis": ("both, SiNGER, PHI-S", {"labels": "phi-s", "rotation": "phi-s"}, "singer"),
    "both-fitnet": ("both, FitNet, no normalisation", {"labels": "none", "rotation": "none"}, "fitnet"),
    "both-fitnet-phis": ("both, FitNet, PHI-S", {"labels": "phi-s", "rotation": "phi-s"}, "fitnet"),
    "artifact-singer": ("both (labels teacher with artifacts), SiNGER", {"labels-artifact": "none", "rotation": "none"}, "singer"),
    "artifact-fitnet": ("both (labels teacher with artifacts), FitNet", {"labels-artifact": "none", "rotation": "none"}, "fitnet"),
}
TASKS = ("classes", "rotation")


@dataclass
class StudyArguments:
    output_dir: str = field(default="outputs/multi-teacher", metadata={"help": "Where teachers, runs and tables go."})
    seeds: int = field(default=3, metadata={"help": "Seeds per student (mean ± std over them)."})
    teacher_steps: int = field(default=800, metadata={"help": "Training steps of each teacher (batch 128)."})
    student_steps: int = field(default=800, metadata={"help": "Training steps of every student (batch 64, lr 1e-3, AdamW)."})
    train_images: int = field(default=10_000, metadata={"help": "Training images the teachers and students read."})
    probe_images: int = field(default=1_000, metadata={"help": "Training and test images of each linear probe (each)."})
    normalization_batches: int = field(default=4, metadata={"help": "Batches of 64 the PHI-S statistics are estimated from."})
    students: str = field(default=",".join([*STUDENTS, "untrained"]), metadata={"help": "The students to run, comma-separated."})
    threads: int = field(default=1, metadata={"help": "torch threads of this process."})


# -- images ----------------------------------------------------------------------------------------
def load_images(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B×3×28×28 floats in [0, 1], labels) of the first `count` images of a split after a fixed shuffle."""
    columns = load_fashion_mnist(split).shuffle(seed=0).select(range(count)).with_format("numpy")[:]
    pixels = torch.from_numpy(columns["image"].astype("float32") / 255).unsqueeze(1).expand(-1, 3, -1, -1)
    return pixels.contiguous(), torch.from_numpy(columns["label"].astype("int64"))


def normalise(pixels: torch.Tensor, stats, size: int | None = None) -> torch.Tensor:
    mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in stats)
    if size is not None and size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (pixels - mean) / std


def rotated(pixels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image rotated by a random multiple of 90°, and that multiple (the rotation task)."""
    turns = torch.randint(0, 4, (pixels.shape[0],), generator=generator)
    return torch.stack([torch.rot90(image, int(k), dims=(1, 2)) for image, k in zip(pixels, turns)]), turns


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 px (the same crop reaches every teacher and the student)."""
    flip = torch.rand(pixels.shape[0], generator=generator) < 0.5
    pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    padded = F.pad(pixels, (2, 2, 2, 2))
    dx, dy = (int(value) for value in torch.randint(0, 5, (2,), generator=generator))
    return padded[..., dy : dy + pixels.shape[-2], dx : dx + pixels.shape[-1]]


def vit(layers: int, width: int, image_size: int, seed: int) -> ViTModel:
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * width,
                       image_size=image_size, patch_size=4, layer_norm_eps=1e-6)  # fmt: skip
    return ViTModel(config, add_pooling_layer=False)


# -- teachers --------------------------------------------------------------------------------------
def train_teacher(name: str, args: StudyArguments, images: torch.Tensor, labels: torch.Tensor, folder: Path) -> None:
    spec = TEACHERS[name]
    print(f"[teachers] training the {name} teacher ({args.teacher_steps} steps) ...", flush=True)
    model = vit(spec["layers"], spec["width"], spec["image_size"], seed=100 + len(name))
    head = torch.nn.Linear(spec["width"], spec["classes"])
    parameters = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=args.teacher_steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.teacher_steps):
        batch = torch.randint(0, len(images), (128,), generator=generator)
        pixels, targets = augment(images[batch], generator), labels[batch]
        if name == "rotation":
            pixels, targets = rotated(pixels, generator)
        tokens = model(pixel_values=normalise(pixels, spec["stats"], spec["image_size"])).last_hidden_state
        loss = F.cross_entropy(head(tokens[:, 0]), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.save_pretrained(str(folder))


def plant_artifacts(images: torch.Tensor, labels: torch.Tensor, source: Path, folder: Path) -> None:
    """The labels teacher with register neurons planted in block `PLANT_BLOCK` (benchmarks/register_neurons.py),
    its later blocks, final norm and a new head fine-tuned on the labels."""
    print(f"[teachers] planting artifacts in the labels teacher's block {PLANT_BLOCK}, fine-tuning after it ...", flush=True)
    spec = TEACHERS["labels"]
    torch.manual_seed(0)
    model = ViTForImageClassification.from_pretrained(str(source), num_labels=spec["classes"])
    pixels = normalise(images[:4000], spec["stats"])
    plant_register_neurons(model, pixels, blank_patches(images[:4000, 0], 4), block=PLANT_BLOCK)
    finetune_after(model, PLANT_BLOCK, normalise(images, spec["stats"]), labels, FINETUNE_STEPS)
    model.vit.save_pretrained(str(folder))


def artifact_report(model, images: torch.Tensor, stats, image_size: int) -> dict:
    """Outlier share and max/median patch norm of the last two blocks' outputs (the distilled ones)."""
    view = resolve_vit(model)
    with torch.no_grad():
        outputs = view.block_outputs(normalise(images, stats, image_size))
    return {
        str(block): {"outlier_share": (stats_ := artifact_stats(outputs[block], view.num_prefix_tokens))["outlier_share"],
                     "max_median": stats_["max_median_ratio"]["mean"]}
        for block in (view.depth - 2, view.depth - 1)
    }  # fmt: skip


def wait_for_teacher(folder: Path) -> ViTModel:
    """The teacher saved in `folder`, once the process training it has saved it."""
    while not (folder / "model.safetensors").exists():
        time.sleep(10)
    time.sleep(2)
    return ViTModel.from_pretrained(str(folder)).eval()


# -- probes ----------------------------------------------------------------------------------------
@torch.no_grad()
def features(model, pixels: torch.Tensor, stats, image_size: int) -> torch.Tensor:
    """CLS token and mean patch token of the last block's output (before the final norm), concatenated."""
    view = resolve_vit(model)
    view.backbone.eval()
    outputs = [view.block_outputs(normalise(chunk, stats, image_size))[-1] for chunk in pixels.split(500)]
    tokens = torch.cat(outputs)
    return torch.cat([tokens[:, 0], tokens[:, view.num_prefix_tokens :].mean(1)], dim=1)


def probe(model, probe_sets: dict, stats, image_size: int) -> dict[str, float]:
    accuracies = {}
    for task, ((train_pixels, train_labels), (test_pixels, test_labels)) in probe_sets.items():
        train, test = features(model, train_pixels, stats, image_size), features(model, test_pixels, stats, image_size)
        accuracies[task] = 100 * linear_probe_accuracy(train, train_labels, test, test_labels)
    return accuracies


# -- students --------------------------------------------------------------------------------------
def train_student(kind: str, seed: int, args: StudyArguments, teachers: dict[str, Path], images: torch.Tensor) -> tuple[ViTModel, dict]:
    _, normalizations, method = STUDENTS[kind]
    set_seed(seed)
    student = vit(4, 64, 28, seed=seed)
    settings = {}
    for name, normalization in normalizations.items():
        spec = TEACHERS[name]
        settings[name] = TeacherSettings(
            layers=[spec["layers"] - 2, spec["layers"] - 1], normalization=normalization,
            image_mean=spec["stats"][0], image_std=spec["stats"][1], image_size=spec["image_size"],
        )  # fmt: skip
    config = DistillationModelConfig(method=method, rank=16, adapter_seed=seed) if method == "singer" else DistillationModelConfig(method=method)
    # Fresh copies: SiNGER's PEFT adapters are injected into the teacher's modules in place.
    fresh = {name: ViTModel.from_pretrained(str(teachers[name])) for name in settings}
    model = DistillationModel(fresh, student, config, settings, image_statistics=FASHION_STATS)
    generator = torch.Generator().manual_seed(seed)
    batches = lambda: normalise(augment(images[torch.randint(0, len(images), (64,), generator=generator)], generator), FASHION_STATS)  # noqa: E731
    model.fit_target_normalization(batches() for _ in range(args.normalization_batches))
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=args.student_steps, pct_start=0.1)
    model.train()
    for _ in range(args.student_steps):
        output = model(batches())
        optimizer.zero_grad()
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
    return student, {term: float(value) for term, value in output.losses.items()}


def claim(path: Path) -> bool:
    """True for the one process that creates `path` (a run's claim; a stale claim is deleted by hand)."""
    try:
        path.open("x").close()
        return True
    except FileExistsError:
        return False


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def main(argv: list[str] | None = None) -> dict:
    (args,) = StrictArgumentParser(StudyArguments).parse(sys.argv[1:] if argv is None else argv)
    for name in ("seeds", "teacher_steps", "student_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    kinds = args.students.split(",")
    if unknown := [kind for kind in kinds if kind not in [*STUDENTS, "untrained"]]:
        raise ValueError(f"students: {unknown} are not among {[*STUDENTS, 'untrained']}")
    if not 100 <= args.probe_images <= 10_000 or not 1_000 <= args.train_images <= 60_000:
        raise ValueError(f"probe_images / train_images: must be in 100..10000 / 1000..60000, got {args.probe_images} / {args.train_images}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    output = Path(args.output_dir)
    (output / "runs").mkdir(parents=True, exist_ok=True)
    images, labels = load_images("train", args.train_images)
    teacher_dirs = {name: output / "teachers" / name for name in TEACHERS}
    for name, folder in teacher_dirs.items():  # each teacher trained by the first process to claim it
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not (folder / "config.json").exists() and claim(folder.with_suffix(".claimed")):
            if "derived_from" in TEACHERS[name]:
                wait_for_teacher(teacher_dirs[TEACHERS[name]["derived_from"]])
                plant_artifacts(images, labels, teacher_dirs[TEACHERS[name]["derived_from"]], folder)
            else:
                train_teacher(name, args, images, labels, folder)
    teachers = {name: wait_for_teacher(folder) for name, folder in teacher_dirs.items()}
    generator = torch.Generator().manual_seed(1)
    probe_sets = {}
    splits = [load_images(split, args.probe_images) for split in ("train", "test")]
    probe_sets["classes"] = splits
    probe_sets["rotation"] = [rotated(pixels, generator) for pixels, _ in splits]

    results = {"teachers": {}, "runs": []}
    for name, teacher in teachers.items():
        spec = TEACHERS[name]
        results["teachers"][name] = probe(teacher, probe_sets, spec["stats"], spec["image_size"])
        results.setdefault("teacher_artifacts", {})[name] = artifact_report(teacher, probe_sets["classes"][1][0][:500], spec["stats"], spec["image_size"])
        print(f"[teachers] {name}: " + ", ".join(f"{task} {value:.2f} %" for task, value in results["teachers"][name].items()), flush=True)
    for seed in range(args.seeds):
        for kind in kinds:
            path = output / "runs" / f"{kind}-seed{seed}.json"
            if path.exists() or not claim(path.with_suffix(".claimed")):
                continue  # done, or another process's
            began = time.perf_counter()
            if kind == "untrained":
                student, losses = vit(4, 64, 28, seed=seed), {}
            else:
                student, losses = train_student(kind, seed, args, teacher_dirs, images)
            run = {"student": kind, "seed": seed, "probe": probe(student, probe_sets, FASHION_STATS, 28), "final_losses": losses}
            run["seconds"] = time.perf_counter() - began
            path.write_text(json.dumps(run, indent=2) + "\n")
            results["runs"].append(run)
            print(f"[runs] {kind} seed {seed}: " + ", ".join(f"{t} {v:.2f} %" for t, v in run["probe"].items()) + f" ({run['seconds']:.0f} s)", flush=True)

    paths = [output / "runs" / f"{kind}-seed{seed}.json" for seed in range(args.seeds) for kind in kinds]
    if not all(path.exists() for path in paths):
        print("[runs] other processes are still running; the last one writes the tables", flush=True)
        return results
    results["runs"] = [json.loads(path.read_text()) for path in paths]
    summary = {}
    for kind in kinds:
        runs = [run for run in results["runs"] if run["student"] == kind]
        summary[kind] = {task: mean_std([run["probe"][task] for run in runs]) for task in TASKS}
    results.update(arguments=asdict(args), summary=summary, seconds=time.perf_counter() - start, threads=torch.get_num_threads())
    (output / "multi_teacher.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(args, results)
    (output / "multi_teacher.md").write_text(table)
    print(table)
    return results


def markdown(args: StudyArguments, results: dict) -> str:
    def cell(entry: dict) -> str:
        return f"{entry['mean']:.2f} ± {entry['std']:.2f}"

    lines = [f"Linear-probe test accuracy (%), mean ± std over {args.seeds} seed(s); {args.student_steps} student steps, "
             f"probes on {args.probe_images} + {args.probe_images} images", "",
             "| model | classes (10) | rotation (4) | mean of the two |", "|---|---|---|---|"]  # fmt: skip
    for name, accuracies in results["teachers"].items():
        lines.append(f"| *{name} teacher itself* | {accuracies['classes']:.2f} | {accuracies['rotation']:.2f} | "
                     f"{(accuracies['classes'] + accuracies['rotation']) / 2:.2f} |")  # fmt: skip
    titles = {kind: title for kind, (title, _, _) in STUDENTS.items()} | {"untrained": "untrained student (floor)"}
    for kind, title in titles.items():
        if kind not in results["summary"]:
            continue
        entry = results["summary"][kind]
        both = [(a + b) / 2 for a, b in zip(entry["classes"]["values"], entry["rotation"]["values"])]
        lines.append(f"| {title} | {cell(entry['classes'])} | {cell(entry['rotation'])} | {cell(mean_std(both))} |")
    lines += ["", "The teachers' distilled blocks, on 500 test images: share of patch tokens above 4× their image's median "
              "norm, and each image's largest patch norm over its median (mean over the images)", "",
              "| teacher | block | outlier share | max/median |", "|---|---|---|---|"]  # fmt: skip
    for name, blocks in results["teacher_artifacts"].items():
        for block, values in blocks.items():
            lines.append(f"| {name} | {block} | {100 * values['outlier_share']:.2f} % | {values['max_median']:.2f} |")
    lines += ["", f"Whole study (this process): {results['seconds'] / 60:.0f} min, {results['threads']} thread(s).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
