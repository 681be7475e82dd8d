"""A finished run's artifact report: the final statistics and the patch-norm figures of each student.

`write_artifact_files` fills a student folder's `artifacts/` (`layout.ARTIFACTS_DIR`) from the
statistics the trainer logged last and from the patch norms of a few fixed images
(`DistillationModel.artifact_norms`); the figures are `diagnostics`' own, the model card shows both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .artifacts import DEFAULT_OUTLIER_RATIO, STATISTICS, VIEWS, norm_statistics
from .diagnostics import norm_histograms_figure, norm_maps_figure
from .layout import ARTIFACT_FIGURES, ARTIFACT_STATS_FILE, ARTIFACTS_DIR
from .modeling import DistillationModel

VIEW_LABELS = {"teacher": "teacher", "refined_teacher": "refined teacher", "student": "student"}


def write_artifact_files(
    folder: Path,
    model: DistillationModel,
    student: str,
    norms: dict[str, torch.Tensor],
    images: torch.Tensor | None,
    final_log: dict | None,
    images_source: str,
) -> dict:
    """Write `artifact_stats.json` and the figures of `student` into `folder`; returns the statistics.

    `norms`: `artifact_norms`' B×P patch norms by key, `images` those images (B×H×W×3 in [0, 1]);
    no figures without them;
    `final_log`: the last log entry holding `artifacts/...` statistics (None: the table is computed
    from the figures' images instead, and says so)."""
    several_students, several_teachers = len(model.students) > 1, len(model.teachers) > 1
    layers, shown = [], {}
    for pair in (pair for pair in model.pairs if pair.student == student):
        teacher_names = [pair.teacher] * several_teachers
        names = {view: [student] * several_students + teacher_names for view in VIEWS} | {"teacher": teacher_names}
        for teacher_layer, student_layer in zip(pair.teacher_layers, pair.student_layers):
            views = {}
            for view in VIEWS:
                key = "/".join([*names[view], view, str(teacher_layer)])
                logged = final_log is not None and f"{ARTIFACTS_DIR}/{key}/{STATISTICS[0]}" in final_log
                if key in norms:
                    label = f"{pair.teacher} " if several_teachers else ""
                    label += f"student block {student_layer}" if view == "student" else f"{VIEW_LABELS[view]} block {teacher_layer}"
                    shown[label] = norms[key]
                if logged:
                    views[view] = {stat: final_log.get(f"{ARTIFACTS_DIR}/{key}/{stat}") for stat in STATISTICS}
                elif final_log is None and key in norms:
                    views[view] = {stat: value.mean().item() for stat, value in norm_statistics(norms[key]).items()}
            layers.append({"teacher": pair.teacher if several_teachers else None, "teacher_block": teacher_layer,
                           "student_block": student_layer, "views": views})  # fmt: skip
    statistics = {
        "outlier_ratio": DEFAULT_OUTLIER_RATIO,
        "source": (
            f"the mean over the last logged training interval (up to step {final_log['step']})"
            if final_log is not None
            else f"{images_source} (no training statistics were logged)"
        ),
        "figure_images": images_source if shown else None,
        "layers": layers,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ARTIFACT_STATS_FILE).write_text(json.dumps(statistics, indent=2) + "\n")
    if shown:
        maps, histograms = ARTIFACT_FIGURES
        norm_maps_figure(images, shown, folder / maps)
        norm_histograms_figure(shown, folder / histograms, DEFAULT_OUTLIER_RATIO)
    return statistics
