#!/usr/bin/env python
"""The offline demo: a complete SiNGER distillation on Fashion-MNIST, on a CPU, in minutes.

No pretrained ViT can be downloaded here, so the demo first trains its own small teacher
(singer_hf/demo/teacher.py), then distils it with SiNGER into a smaller student trained from
scratch (scripts/distill.py with configs/demo.yaml, the data streamed from a local Parquet file),
and finally compares linear probes on the test set: teacher, distilled student, and the same
student architecture left at its random initialisation.

    python scripts/demo.py                 # everything, outputs in outputs/demo
    python scripts/demo.py --max_steps 50  # extra flags go to scripts/distill.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from transformers import AutoImageProcessor, set_seed
from transformers.trainer import TRAINER_STATE_NAME

from singer_hf.architectures import load_backbone
from singer_hf.commands import distill
from singer_hf.demo.fashion_mnist import fashion_mnist_images, load_fashion_mnist
from singer_hf.demo.probe import cls_features, linear_probe_accuracy
from singer_hf.demo.teacher import DemoTeacherArguments, train_demo_teacher
from singer_hf.diagnostics import artifact_history_figure
from singer_hf.layout import ARTIFACT_STATS_FILE, ARTIFACTS_DIR

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = Path("outputs/demo")
PROBE_TRAIN, PROBE_TEST = 10_000, 10_000


def artifact_lines(student_dir: Path) -> list[str]:
    """The run's final artifact statistics (`artifacts/artifact_stats.json`), one line per view and block."""
    path = student_dir / ARTIFACTS_DIR / ARTIFACT_STATS_FILE
    if not path.is_file():
        return ["artifact statistics: not recorded (--artifact_stats false)"]
    stats = json.loads(path.read_text())
    lines = [f"artifact statistics ({stats['source']}; outlier: patch norm > {stats['outlier_ratio']:g}× its image's median):"]
    for layer in stats["layers"]:
        for view, values in layer["views"].items():
            block = layer["student_block"] if view == "student" else layer["teacher_block"]
            lines.append(
                f"  {view.replace('_', ' '):<16} block {block} (teacher block {layer['teacher_block']}): outlier share "
                f"{100 * values['outlier_share']:.2f} %, max/median {values['max_median']:.2f}, p99/median {values['p99_median']:.2f}"
            )
    return lines


def main(extra_flags: list[str]) -> None:
    start = time.perf_counter()
    teacher_dir, data_dir, student_dir = OUTPUT / "teacher", OUTPUT / "fashion_mnist", OUTPUT / "student"
    if (teacher_dir / "config.json").exists():
        print(f"Reusing the demo teacher in {teacher_dir} (delete it to retrain).")
    else:
        print(f"1/3 Training the demo teacher on Fashion-MNIST (one epoch) into {teacher_dir} ...")
        train_demo_teacher(DemoTeacherArguments(output_dir=str(teacher_dir)))
    for split in ("train", "test"):  # train.parquet / test.parquet: an HF dataset folder, also for evaluate.py
        if not (data_dir / f"{split}.parquet").exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            load_fashion_mnist(split).to_parquet(str(data_dir / f"{split}.parquet"))
    teacher_seconds = time.perf_counter() - start
    print(f"2/3 Distilling it with SiNGER into a student trained from scratch ({student_dir}) ...")

    result = distill.main(
        [str(ROOT / "configs" / "demo.yaml"), "--teacher_name_or_path", str(teacher_dir),
         "--dataset_name", str(data_dir), "--output_dir", str(student_dir), "--overwrite_output_dir", "true", *extra_flags]
    )  # fmt: skip
    distill_seconds = time.perf_counter() - start - teacher_seconds
    history = OUTPUT / "artifact_history.png"  # the logged artifact statistics over training
    log_history = json.loads((student_dir / TRAINER_STATE_NAME).read_text())["log_history"]
    artifact_history_figure(log_history, history, ("outlier_share", "max_median"))

    print("3/3 Linear probes on the frozen features of the teacher, the student and an untrained student ...")
    processor = AutoImageProcessor.from_pretrained(str(student_dir))
    train_images, train_labels = fashion_mnist_images("train", PROBE_TRAIN, processor)
    test_images, test_labels = fashion_mnist_images("test", PROBE_TEST, processor)
    student = load_backbone(str(student_dir))
    set_seed(0)
    untrained = type(student)(student.config)  # same architecture, random weights: the floor
    accuracies = {}
    for name, model in (("teacher", load_backbone(str(teacher_dir))), ("student", student), ("untrained", untrained)):
        accuracies[name] = linear_probe_accuracy(
            cls_features(model, train_images), train_labels, cls_features(model, test_images), test_labels
        )
    total = time.perf_counter() - start
    print(
        "\n=== SiNGER offline demo: summary ===\n"
        f"teacher  ({teacher_dir}): linear probe {accuracies['teacher']:.2%}\n"
        f"student  ({student_dir}): linear probe {accuracies['student']:.2%} after {result['metrics'].get('train_runtime', 0):.0f} s of distillation\n"
        f"untrained student (same architecture, random init): linear probe {accuracies['untrained']:.2%}\n"
        f"final losses: {result['losses']}\n"
        + "\n".join(artifact_lines(student_dir)) + "\n"
        f"artifact statistics over training: {history}\n"
        f"time: teacher {teacher_seconds:.0f} s, distillation {distill_seconds:.0f} s, total {total:.0f} s\n"
        f"Load the student without singer_hf:\n"
        f'    AutoModel.from_pretrained("{student_dir}"), AutoImageProcessor.from_pretrained("{student_dir}")'
    )


if __name__ == "__main__":
    main(sys.argv[1:])
