#!/usr/bin/env python
"""The evidence study: SiNGER vs FitNet vs ViTKD on Fashion-MNIST, from a teacher without and one with
high-norm artifact tokens, measured by linear probes and artifact statistics.

    python benchmarks/evidence.py                      # the whole study (about an hour on 2 CPU cores)
    python benchmarks/evidence.py --seeds 1 --student_steps 20 --base_teacher_steps 20 \
        --finetune_steps 10 --probe_images 1000 --train_images 4000 --teacher_test_images 1000 \
        --output_dir outputs/evidence-smoke   # a smoke run

1. Teachers. A base ViT (the demo's: 6 blocks, 128 wide, 28 px, 4 px patches) is trained on the
   labels (singer_hf/demo/teacher.py); two teachers are derived from it with the same budget:
   *natural*: its blocks after `plant_block` fine-tuned on the labels; *artifact*: register neurons
   planted in block `plant_block` (benchmarks/register_neurons.py), then the same fine-tuning.
2. Students (4 blocks, 64 wide, from scratch), each teacher × seed, all with scripts/distill.py and
   the demo recipe (configs/demo.yaml) at the same steps, batch and lr schedule: SiNGER; SiNGER with
   random adapter init; SiNGER with λ_info = 0; FitNet; ViTKD. The five of one teacher and seed train
   together in one run (`--students`: one teacher pass per step; each student gets the updates it
   would get alone); `--grouped false` runs each on its own, as a check and for comparison. Per seed
   also a student trained on the labels with the same schedule (no distillation) and the untrained
   student (the floor).
3. Measures: linear-probe accuracy on the test set (CLS of the last block before the final norm,
   the demo's L-BFGS probe); each student's artifact statistics at its last block; for the SiNGER
   runs, the raw vs refined teacher statistics and the information-preservation error; the
   teachers' artifact statistics (bimodality, where the outliers sit, what a probe reads from them).

Writes `evidence.json`, `evidence.md`, `norm_maps.png` and `norm_histograms.png` to `output_dir`;
each run's result is kept in `runs/<name>/result.json`, so an interrupted study resumes where it
stopped (`--overwrite true` starts over).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import peft
import torch
from transformers import AutoImageProcessor, Trainer, ViTConfig, ViTForImageClassification, set_seed

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks")]
from register_neurons import blank_patches, finetune_after, plant_register_neurons  # noqa: E402

from singer_hf import resolve_vit  # noqa: E402
from singer_hf.architectures import load_backbone  # noqa: E402
from singer_hf.cli import StrictArgumentParser, run_cli  # noqa: E402
from singer_hf.commands import distill  # noqa: E402
from singer_hf.data import (  # noqa: E402
    ImageTransform,
    PixelValuesCollator,
    build_transforms,
    image_processor_stats,
    load_image_dataset,
    with_image_transform,
)
from singer_hf.diagnostics import artifact_stats, norm_histograms_figure, norm_maps_figure, patch_norms  # noqa: E402
from singer_hf.demo.fashion_mnist import fashion_mnist_images, load_fashion_mnist  # noqa: E402
from singer_hf.demo.probe import cls_features, linear_probe_accuracy  # noqa: E402
from singer_hf.demo.teacher import DemoTeacherArguments, train_demo_teacher  # noqa: E402
from singer_hf.modeling import DistillationModelConfig  # noqa: E402
from singer_hf.layout import CONFIG_FILE, DISTILLATION_DIR  # noqa: E402

RECIPE = ROOT / "configs" / "demo.yaml"
OUTLIER_RATIO = 4.0
VALLEY = (2.0, 4.0)
"""Norms between these multiples of the image's median: the valley of a bimodal norm distribution."""
STUDENTS = {
    "singer": ("SiNGER", []),
    "singer-random-init": ("SiNGER, random adapter init", ["--adapter_init", "random"]),
    "singer-no-info": ("SiNGER, λ_info = 0", ["--info_weight", "0"]),
    "fitnet": ("FitNet", ["--method", "fitnet"]),
    "vitkd": ("ViTKD", ["--method", "vitkd"]),
}
BASELINES = {"supervised": "no distillation: trained on the labels", "untrained": "untrained (random init)"}
TEACHERS = ("natural", "artifact")


@dataclass
class EvidenceArguments:
    output_dir: str = field(default="outputs/evidence", metadata={"help": "Where teachers, runs, tables and figures go."})
    seeds: int = field(default=3, metadata={"help": "Seeds per student (mean ± std over them)."})
    student_steps: int = field(default=300, metadata={"help": "Training steps of every student (batch 64, configs/demo.yaml)."})
    base_teacher_steps: int = field(default=469, metadata={"help": "Base teacher training steps (batch 128; 469 = one epoch)."})
    finetune_steps: int = field(default=150, metadata={"help": "Steps fine-tuning the blocks after plant_block, for both teachers."})
    plant_block: int = field(default=2, metadata={"help": "Teacher block whose MLP gets the register neurons."})
    artifact_share: float = field(default=0.025, metadata={"help": "Share of patch tokens the register neurons fire on."})
    artifact_ratio: float = field(default=8.0, metadata={"help": "Norm they write, in medians of the block's patch norms."})
    train_images: int = field(
        default=60_000, metadata={"help": "Training images the teachers are fine-tuned on (the first N after a fixed shuffle; >= 4000)."}
    )
    teacher_test_images: int = field(default=10_000, metadata={"help": "Test images the base teacher's accuracy is measured on."})
    probe_images: int = field(default=10_000, metadata={"help": "Training and test images of each linear probe (each)."})
    stats_images: int = field(default=5_000, metadata={"help": "Test images the artifact statistics are computed on."})
    workers: int = field(default=2, metadata={"help": "Runs in parallel (one CPU thread each)."})
    grouped: bool = field(
        default=True,
        metadata={"help": "Train the distilled students of each teacher and seed in one run (one teacher pass per step); "
                  "false: one run per student (the same students, slower)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Start over instead of reusing finished teachers and runs."})


def check_arguments(args: EvidenceArguments) -> None:
    for name in ("seeds", "student_steps", "base_teacher_steps", "finetune_steps", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.plant_block < 4:
        raise ValueError(f"plant_block: must be in 0..3 (blocks 4 and 5 of the 6-block teacher are the distilled ones), got {args.plant_block}")
    if not 0 < args.artifact_share < 0.5:
        raise ValueError(f"artifact_share: must be in (0, 0.5), got {args.artifact_share}")
    if args.artifact_ratio <= OUTLIER_RATIO:
        raise ValueError(f"artifact_ratio: must be above the outlier cut-off {OUTLIER_RATIO}, got {args.artifact_ratio}")
    if args.probe_images < 100 or args.stats_images < 100:
        raise ValueError(f"probe_images / stats_images: must be >= 100, got {args.probe_images} / {args.stats_images}")
    if not 4_000 <= args.train_images <= 60_000 or not 100 <= args.teacher_test_images <= 10_000:
        raise ValueError(
            f"train_images / teacher_test_images: must be in 4000..60000 (register neurons are planted from the first 4000) / "
            f"100..10000, got {args.train_images} / {args.teacher_test_images}"
        )


# -- images ----------------------------------------------------------------------------------------
def intensities(pixel_values: torch.Tensor, processor) -> torch.Tensor:
    """B×3×H×W normalised images → B×H×W intensities in [0, 1] (Fashion-MNIST is grey)."""
    mean, std, _ = image_processor_stats(processor)
    return (pixel_values[:, 0] * std[0] + mean[0]).clamp(0, 1)


@torch.no_grad()
def block_outputs(model, pixel_values: torch.Tensor, last_block: int | None = None) -> list[torch.Tensor]:
    vit = resolve_vit(model)
    vit.backbone.eval()
    chunks = [vit.block_outputs(chunk, last_block) for chunk in pixel_values.split(500)]
    return [torch.cat(parts) for parts in zip(*chunks)]


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


# -- teachers --------------------------------------------------------------------------------------
def build_teachers(args: EvidenceArguments, output: Path) -> dict:
    """Trains the base teacher and derives the natural and the artifact teacher; returns what was done."""
    record_path = output / "teachers.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    base = output / "teachers" / "base"
    start = time.perf_counter()
    print(f"[teachers] training the base teacher ({args.base_teacher_steps} steps) ...", flush=True)
    _, base_accuracy = train_demo_teacher(
        DemoTeacherArguments(output_dir=str(base), max_steps=args.base_teacher_steps, max_test_samples=args.teacher_test_images)
    )
    processor = AutoImageProcessor.from_pretrained(str(base))
    train_images, train_labels = fashion_mnist_images("train", args.train_images, processor)
    record = {"base": {"steps": args.base_teacher_steps, "test_accuracy": base_accuracy, "seconds": time.perf_counter() - start}}
    for name in TEACHERS:
        start = time.perf_counter()
        model = ViTForImageClassification.from_pretrained(str(base))
        planted = None
        if name == "artifact":
            sample = train_images[:4000]
            planted = plant_register_neurons(
                model, sample, blank_patches(intensities(sample, processor), model.config.patch_size),
                block=args.plant_block, share=args.artifact_share, ratio=args.artifact_ratio,
            )  # fmt: skip
        print(f"[teachers] fine-tuning the {name} teacher's blocks after {args.plant_block} ({args.finetune_steps} steps) ...", flush=True)
        losses = finetune_after(model, args.plant_block, train_images, train_labels, args.finetune_steps)
        model.save_pretrained(str(output / "teachers" / name))
        processor.save_pretrained(str(output / "teachers" / name))
        record[name] = {"planted": planted, "finetune_losses": losses, "seconds": time.perf_counter() - start}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def teacher_report(path: Path, layers: list[int], plant_block: int, stats_images: int, probe_images: int) -> dict:
    """Classifier accuracy, probe accuracy and, per block, the artifact statistics of one teacher."""
    processor = AutoImageProcessor.from_pretrained(str(path))
    classifier = ViTForImageClassification.from_pretrained(str(path)).eval()
    images, labels = fashion_mnist_images("test", stats_images, processor)
    logits = torch.cat([classifier(pixel_values=chunk).logits for chunk in images.split(500)])
    outputs = block_outputs(classifier, images)
    blank = blank_patches(intensities(images, processor), classifier.config.patch_size)
    report = {"test_accuracy": (logits.argmax(-1) == labels).float().mean().item(), "blocks": {}}
    report["linear_probe"] = probe_accuracy(classifier, processor, probe_images)
    for block in sorted({plant_block, *layers}):
        report["blocks"][str(block)] = token_report(outputs[block], blank, labels)
    return report


def token_report(features: torch.Tensor, blank: torch.Tensor, labels: torch.Tensor) -> dict:
    """Artifact statistics of one block output (B×N×D, one prefix token), plus where the outliers sit
    (blank patches?) and what a linear probe reads from them vs from normal patch tokens."""
    stats = artifact_stats(features, prefix_tokens=1, outlier_ratio=OUTLIER_RATIO)
    norms = patch_norms(features, 1)
    ratio = norms / norms.median(dim=1, keepdim=True).values
    outliers = ratio > OUTLIER_RATIO
    stats["valley_share"] = ((ratio > VALLEY[0]) & (ratio <= VALLEY[1])).float().mean().item()
    stats["bimodal"] = stats["outlier_share"] > 0 and stats["valley_share"] < stats["outlier_share"]
    stats["images_with_outliers"] = outliers.any(dim=1).float().mean().item()
    stats["blank_share_of_patches"] = blank.float().mean().item()
    if not outliers.any():
        stats.update(outlier_norm_over_median=None, outliers_on_blank=None, probe_on_outliers=None)
        return stats
    stats["outlier_norm_over_median"] = ratio[outliers].mean().item()
    stats["outliers_on_blank"] = blank[outliers].float().mean().item()
    # One outlier and one normal patch token (drawn at random) per image that has an outlier; the
    # probe is trained on the first half of those images and tested on the other half.
    images = torch.nonzero(outliers.any(dim=1)).squeeze(1)
    generator = torch.Generator().manual_seed(0)
    patches = features[:, 1:]
    picks = {"outlier": [], "normal": []}
    for image in images.tolist():
        for name, mask in (("outlier", outliers[image]), ("normal", ~outliers[image])):
            candidates = torch.nonzero(mask).squeeze(1)
            picks[name].append(patches[image, candidates[torch.randint(len(candidates), (1,), generator=generator)]][0])
    half = len(images) // 2
    targets = labels[images]
    stats["probe_on_outliers"] = {"images": len(images)}
    for name, tokens in (*picks.items(), ("cls", [features[image, 0] for image in images.tolist()])):
        tokens = torch.stack(tokens)
        stats["probe_on_outliers"][name] = linear_probe_accuracy(tokens[:half], targets[:half], tokens[half:], targets[half:])
    return stats


_PROBE_SETS: dict = {}


def probe_accuracy(model, processor, count: int) -> float:
    """Linear-probe test accuracy on CLS features of the last block (the demo's probe)."""
    if count not in _PROBE_SETS:
        _PROBE_SETS[count] = (fashion_mnist_images("train", count, processor), fashion_mnist_images("test", count, processor))
    (train_images, train_labels), (test_images, test_labels) = _PROBE_SETS[count]
    train, test = cls_features(model, train_images), cls_features(model, test_images)
    # The probe's head starts from the global random state: fixed here, so that a student's accuracy does
    # not depend on what ran before it in this process (a group's students are measured one after another).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return linear_probe_accuracy(train, train_labels, test, test_labels)


# -- students --------------------------------------------------------------------------------------
def student_jobs(args: EvidenceArguments, output: Path) -> list[dict]:
    """One job per distilled student (or, grouped, per teacher and seed: all of its students) and per baseline."""
    jobs = []
    for seed in range(args.seeds):
        for teacher in TEACHERS:
            if args.grouped:
                jobs.append({"name": f"{teacher}-seed{seed}", "teacher": teacher, "students": list(STUDENTS), "seed": seed})
            else:
                jobs += [{"name": run_name(teacher, student, seed), "teacher": teacher, "student": student, "seed": seed} for student in STUDENTS]
        for baseline in BASELINES:
            jobs.append({"name": f"{baseline}-seed{seed}", "teacher": None, "student": baseline, "seed": seed})
    common = {"output": str(output), "steps": args.student_steps, "probe_images": args.probe_images, "stats_images": args.stats_images}
    return [{**job, **common} for job in jobs]


def run_name(teacher: str, student: str, seed: int) -> str:
    return f"{teacher}-{student}-seed{seed}"


def student_folder(output: Path, teacher: str, student: str, seed: int) -> Path:
    """Where a distilled student was saved: its own run's folder, or its folder in its group's run."""
    alone = output / "runs" / run_name(teacher, student, seed)
    return alone if alone.is_dir() else output / "runs" / f"{teacher}-seed{seed}" / student


def run_job(job: dict) -> list[dict]:
    """Trains and measures one student, or one group of students; each result is also kept on disk."""
    output = Path(job["output"])
    teacher_dir = output / "teachers" / (job["teacher"] or "natural")
    run_dir = output / "runs" / job["name"]
    students = job["students"] if "students" in job else [job["student"]]
    folders = {student: run_dir / student if "students" in job else run_dir for student in students}
    if all((folder / "result.json").exists() for folder in folders.values()):
        return [json.loads((folder / "result.json").read_text()) for folder in folders.values()]
    start = time.perf_counter()
    flags = ["--teacher_name_or_path", str(teacher_dir), "--dataset_name", str(output / "fashion_mnist"), "--output_dir", str(run_dir),
             "--overwrite_output_dir", "true", "--max_steps", str(job["steps"]), "--seed", str(job["seed"]),
             "--adapter_seed", str(job["seed"]), "--save_strategy", "no", "--disable_tqdm", "true",
             "--artifact_stats", "false"]  # the study measures the students' artifacts itself, on its test images  # fmt: skip
    if "students" in job:
        entries = [{"name": student, **dict(zip(STUDENTS[student][1][::2], STUDENTS[student][1][1::2]))} for student in students]
        entries = [{key.removeprefix("--"): value for key, value in entry.items()} for entry in entries]
        losses = distill.main([str(RECIPE), *flags, "--students", json.dumps(entries)])["losses"]
        losses = {student: {key.replace(f"/{student}/", "_").replace("_total", ""): value for key, value in losses.items()
                            if key.startswith(f"loss/{student}/")} for student in students}  # fmt: skip
    elif job["student"] in STUDENTS:
        losses = {job["student"]: distill.main([str(RECIPE), *flags, *STUDENTS[job["student"]][1]])["losses"]}
    else:
        losses = {job["student"]: train_baseline(job, flags, run_dir)}
    seconds = (time.perf_counter() - start) / len(students)  # a group's time, shared out
    results = []
    for student, folder in folders.items():
        name = run_name(job["teacher"], student, job["seed"]) if job["teacher"] and student in STUDENTS else job["name"]
        results.append(measure({**job, "name": name, "student": student}, folder, teacher_dir, losses[student], seconds))
    return results


def measure(job: dict, run_dir: Path, teacher_dir: Path, losses: dict, training_seconds: float) -> dict:
    """A trained student's probe accuracy and artifact statistics (and SiNGER's refinement), kept in its result.json."""
    start = time.perf_counter()
    student = load_backbone(str(run_dir))
    config = json.loads((run_dir / DISTILLATION_DIR / CONFIG_FILE).read_text()) if job["student"] in STUDENTS else None
    processor = AutoImageProcessor.from_pretrained(str(teacher_dir))
    images, _ = fashion_mnist_images("test", job["stats_images"], processor)
    student_vit = resolve_vit(student)
    last = block_outputs(student, images)[-1]
    result = {
        **{key: job[key] for key in ("name", "teacher", "student", "seed")},
        "linear_probe": probe_accuracy(student, processor, job["probe_images"]),
        "student_last_block": artifact_stats(last, student_vit.num_prefix_tokens, OUTLIER_RATIO),
        "final_losses": losses,
        "distillation": config and {key: config[key] for key in ("teacher_layers", "student_layers")},
    }
    if job["student"].startswith("singer"):
        result["refinement"] = refinement_report(teacher_dir, run_dir, config["teacher_layers"], images)
    result["seconds"] = training_seconds + time.perf_counter() - start
    result_path = run_dir / "result.json"
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[runs] {job['name']}: probe {100 * result['linear_probe']:.2f} % ({result['seconds']:.0f} s)", flush=True)
    return json.loads(result_path.read_text())  # as a resumed study reads it (block numbers as strings)


def train_baseline(job: dict, flags: list[str], run_dir: Path) -> dict:
    """The supervised student (labels, the distillation runs' schedule) or the untrained one: saved like a distilled student."""
    model_args, data_args, training_args = distill.parse_arguments([str(RECIPE), *flags])
    teacher = load_backbone(model_args.teacher_name_or_path)
    processor = AutoImageProcessor.from_pretrained(model_args.teacher_name_or_path)
    set_seed(training_args.seed)
    backbone = distill.load_student(model_args, teacher, resolve_vit(teacher).image_size)
    labels = load_fashion_mnist("test").features["label"].names
    config = ViTConfig(**{**backbone.config.to_dict(), "num_labels": len(labels)})
    set_seed(training_args.seed)
    model = ViTForImageClassification(config)
    losses = {}
    if job["student"] == "supervised":
        mean, std, size = image_processor_stats(processor)
        dataset = load_image_dataset(str(data_args.dataset_name), None, "train", "image", streaming=True,
                                     shuffle_buffer=data_args.shuffle_buffer, seed=training_args.seed)  # fmt: skip
        transform = ImageTransform(build_transforms(mean, std, size, train=True), "image", "label", seed=training_args.seed)
        # FeatureDistillationArguments is a TrainingArguments: the same optimizer, lr schedule, steps and batch.
        trainer = Trainer(model=model, args=training_args, train_dataset=with_image_transform(dataset, transform),
                          data_collator=PixelValuesCollator())  # fmt: skip
        losses = {"train_loss": trainer.train().metrics["train_loss"]}
    model.vit.save_pretrained(str(run_dir))
    processor.save_pretrained(str(run_dir))
    return losses


@torch.no_grad()
def refinement_report(teacher_dir: Path, run_dir: Path, layers: list[int], images: torch.Tensor) -> dict:
    """Raw vs refined teacher statistics per distilled block, and the information-preservation error:
    ‖B_{l+1}(R(F^l)) − F^{l+1}‖² / ‖F^{l+1}‖² where block l+1 exists."""
    teacher = load_backbone(str(teacher_dir))
    raw = block_outputs(teacher, images)
    adapted = peft.PeftModel.from_pretrained(teacher, str(run_dir / DISTILLATION_DIR))
    vit = resolve_vit(adapted)
    report = {}
    for layer in layers:
        refined = torch.cat([adapted.base_model.singer_layers[layer].refine(chunk) for chunk in raw[layer].split(500)])
        entry = {"raw": artifact_stats(raw[layer], 1, OUTLIER_RATIO), "refined": artifact_stats(refined, 1, OUTLIER_RATIO)}
        if layer + 1 < vit.depth:
            following = torch.cat([
                vit.run_block(layer + 1, chunk, vit.embed(pixels).block_kwargs)
                for chunk, pixels in zip(refined.split(500), images.split(500))
            ])  # fmt: skip
            entry["info_error"] = ((following - raw[layer + 1]).pow(2).sum() / raw[layer + 1].pow(2).sum()).item()
        report[str(layer)] = entry
    return report


def run_students(args: EvidenceArguments, output: Path) -> list[dict]:
    jobs = student_jobs(args, output)
    print(f"[runs] {len(jobs)} runs{' (the distilled students in one run per teacher and seed)' if args.grouped else ''}, "
          f"{args.workers} at a time ...", flush=True)  # fmt: skip
    if args.workers == 1:
        return [result for job in jobs for result in run_job(job)]
    # One thread per worker: for these small models, parallel runs use the cores better than threads.
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return [result for results in pool.map(run_job, jobs) for result in results]


# -- tables and figures ----------------------------------------------------------------------------
def summarise(results: list[dict]) -> dict:
    rows = {}
    for student in [*STUDENTS, *BASELINES]:
        row = {}
        for teacher in TEACHERS if student in STUDENTS else (None,):
            runs = [r for r in results if r["student"] == student and r["teacher"] == teacher]
            row[teacher or "none"] = {
                "linear_probe": mean_std([100 * r["linear_probe"] for r in runs]),
                "student_max_median_ratio": mean_std([r["student_last_block"]["max_median_ratio"]["mean"] for r in runs]),
                "student_outlier_share": mean_std([100 * r["student_last_block"]["outlier_share"] for r in runs]),
            }
            if student.startswith("singer"):
                row[teacher]["refinement"] = {
                    layer: {
                        "raw_outlier_share": 100 * runs[0]["refinement"][layer]["raw"]["outlier_share"],
                        "refined_outlier_share": mean_std([100 * r["refinement"][layer]["refined"]["outlier_share"] for r in runs]),
                        "raw_max_median_ratio": runs[0]["refinement"][layer]["raw"]["max_median_ratio"]["mean"],
                        "refined_max_median_ratio": mean_std([r["refinement"][layer]["refined"]["max_median_ratio"]["mean"] for r in runs]),
                        "info_error": mean_std([r["refinement"][layer]["info_error"] for r in runs]) if "info_error" in runs[0]["refinement"][layer] else None,
                    }
                    for layer in runs[0]["refinement"]
                }  # fmt: skip
        rows[student] = row
    return rows


def markdown(args: EvidenceArguments, teachers: dict, summary: dict, seconds: float, runs_seconds: float) -> str:
    def cell(entry: dict, digits: int = 2) -> str:
        return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"

    lines = [f"## Linear-probe test accuracy (%), mean ± std over {args.seeds} seeds", "",
             "| student | natural teacher | artifact teacher |", "|---|---|---|"]  # fmt: skip
    lines.append(f"| *teacher itself* | {100 * teachers['natural']['report']['linear_probe']:.2f} | "
                 f"{100 * teachers['artifact']['report']['linear_probe']:.2f} |")  # fmt: skip
    for student, (title, _) in STUDENTS.items():
        lines.append(f"| {title} | {cell(summary[student]['natural']['linear_probe'])} | {cell(summary[student]['artifact']['linear_probe'])} |")
    for baseline, title in BASELINES.items():
        value = cell(summary[baseline]["none"]["linear_probe"])
        lines.append(f"| {title} | {value} | {value} |")
    lines += ["", "## The students' own artifact statistics (last block): max/median patch norm; outliers (% of patch tokens > 4× median)", "",
              "| student | natural teacher | artifact teacher |", "|---|---|---|"]  # fmt: skip
    for student, (title, _) in STUDENTS.items():
        cells = [f"{cell(summary[student][t]['student_max_median_ratio'])}; {cell(summary[student][t]['student_outlier_share'], 3)} %" for t in TEACHERS]
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    for baseline, title in BASELINES.items():
        entry = summary[baseline]["none"]
        value = f"{cell(entry['student_max_median_ratio'])}; {cell(entry['student_outlier_share'], 3)} %"
        lines.append(f"| {title} | {value} | {value} |")
    lines += ["", "## SiNGER's refinement of the teacher's distilled blocks (refined: mean ± std over seeds)", "",
              "| teacher | run | block | outliers raw → refined (%) | max/median raw → refined | info error ‖B(R(F))−B(F)‖²/‖B(F)‖² |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for teacher in TEACHERS:
        for student in (s for s in STUDENTS if s.startswith("singer")):
            for layer, entry in summary[student][teacher]["refinement"].items():
                info = cell(entry["info_error"], 4) if entry["info_error"] else "— (last block)"
                lines.append(f"| {teacher} | {STUDENTS[student][0]} | {layer} | {entry['raw_outlier_share']:.2f} → "
                             f"{cell(entry['refined_outlier_share'])} | {entry['raw_max_median_ratio']:.2f} → "
                             f"{cell(entry['refined_max_median_ratio'])} | {info} |")  # fmt: skip
    lines += ["", "## The teachers' artifact statistics (test images)", "",
              "| teacher | block | max/median (mean) | outliers (% of patches) | per image | images with one | outlier norm / median | "
              "valley 2–4× (%) | bimodal | outliers on blank patches (blank share) | probe: outlier / normal / CLS token (%) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for teacher in TEACHERS:
        for block, stats in teachers[teacher]["report"]["blocks"].items():
            probe = stats["probe_on_outliers"]
            on_blank = f"{100 * stats['outliers_on_blank']:.1f} % ({100 * stats['blank_share_of_patches']:.1f} %)" if probe else "—"
            probes = f"{100 * probe['outlier']:.1f} / {100 * probe['normal']:.1f} / {100 * probe['cls']:.1f} ({probe['images']} images)" if probe else "—"
            ratio = f"{stats['outlier_norm_over_median']:.1f}" if probe else "—"
            lines.append(f"| {teacher} | {block} | {stats['max_median_ratio']['mean']:.2f} | {100 * stats['outlier_share']:.2f} | "
                         f"{stats['outliers_per_image']:.2f} | {100 * stats['images_with_outliers']:.1f} % | {ratio} | "
                         f"{100 * stats['valley_share']:.2f} | {'yes' if stats['bimodal'] else 'no'} | {on_blank} | {probes} |")  # fmt: skip
    lines += ["", f"Teachers' classifier test accuracy: natural {100 * teachers['natural']['report']['test_accuracy']:.2f} %, "
              f"artifact {100 * teachers['artifact']['report']['test_accuracy']:.2f} %. Whole study: {seconds / 60:.1f} min, of which the "
              f"students' runs {runs_seconds / 60:.1f} min ({'grouped: one run per teacher and seed' if args.grouped else 'one run per student'}, "
              f"{args.workers} at a time).", ""]  # fmt: skip
    return "\n".join(lines)


@torch.no_grad()
def figures(output: Path, last_layer: int) -> None:
    """Norm maps (raw vs refined artifact teacher, FitNet vs SiNGER student, seed 0) on the same images, and histograms."""
    processor = AutoImageProcessor.from_pretrained(str(output / "teachers" / "artifact"))
    images, _ = fashion_mnist_images("test", 400, processor)
    teacher = load_backbone(str(output / "teachers" / "artifact"))
    raw = block_outputs(teacher, images)[last_layer]
    norms = patch_norms(raw, 1)
    shown = torch.nonzero((norms > OUTLIER_RATIO * norms.median(dim=1, keepdim=True).values).any(dim=1)).squeeze(1)[:4]
    adapted = peft.PeftModel.from_pretrained(teacher, str(student_folder(output, "artifact", "singer", 0) / DISTILLATION_DIR))
    refined = adapted.base_model.singer_layers[last_layer].refine(raw)
    views = {f"artifact teacher, block {last_layer}": norms, f"refined (SiNGER), block {last_layer}": patch_norms(refined, 1)}
    for student, title in (("fitnet", "FitNet"), ("singer", "SiNGER")):
        model = load_backbone(str(student_folder(output, "artifact", student, 0)))
        views[f"{title} student, last block"] = patch_norms(block_outputs(model, images)[-1], 1)
    pictures = intensities(images[shown], processor)[..., None].expand(-1, -1, -1, 3)
    norm_maps_figure(pictures, {name: values[shown] for name, values in views.items()}, output / "norm_maps.png")
    natural = load_backbone(str(output / "teachers" / "natural"))
    histograms = {f"natural teacher, block {last_layer}": patch_norms(block_outputs(natural, images)[last_layer], 1), **views}
    norm_histograms_figure(histograms, output / "norm_histograms.png", OUTLIER_RATIO)


def main(argv: list[str] | None = None) -> dict:
    (args,) = StrictArgumentParser(EvidenceArguments).parse(sys.argv[1:] if argv is None else argv)
    check_arguments(args)
    start = time.perf_counter()
    output = Path(args.output_dir)
    if args.overwrite and output.exists():
        shutil.rmtree(output)
    data_dir = output / "fashion_mnist"
    for split in ("train", "test"):
        if not (data_dir / f"{split}.parquet").exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            load_fashion_mnist(split).to_parquet(str(data_dir / f"{split}.parquet"))
    teachers = build_teachers(args, output)
    layers = DistillationModelConfig().layers_for(resolve_vit(load_backbone(str(output / "teachers" / "natural"))).depth)
    for name in TEACHERS:
        print(f"[teachers] measuring the {name} teacher ...", flush=True)
        teachers[name]["report"] = teacher_report(output / "teachers" / name, layers, args.plant_block, args.stats_images, args.probe_images)
    runs_start = time.perf_counter()
    results = run_students(args, output)
    runs_seconds = time.perf_counter() - runs_start
    summary = summarise(results)
    figures(output, layers[-1])
    seconds = time.perf_counter() - start
    report = {"arguments": asdict(args), "teachers": teachers, "summary": summary, "runs": results, "seconds": seconds, "runs_seconds": runs_seconds,
              "threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    (output / "evidence.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(args, teachers, summary, seconds, runs_seconds)
    (output / "evidence.md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    run_cli(main)
