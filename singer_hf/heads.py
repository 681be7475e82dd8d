"""Teacher-like features from a distilled student, through the heads saved beside it.

A student distilled with a linear projector per distilled block (SiNGER, FitNet; ViTKD's mimicked
blocks) keeps those projectors in `distillation/[<teacher>/]heads.safetensors`, with the teacher's
target-normalisation statistics when its KD targets were normalised (`TeacherSettings.normalization`).
Applied to the student's block outputs, projector then inverse normalisation give the student's
estimate of each distilled teacher block's features in that teacher's own space, as RADIO's
adaptors give each teacher's features from one backbone. The estimate is on the student's token
grid (the projector is per token; in training, KD resampled it onto the teacher's grid).

    student = transformers.AutoModel.from_pretrained(folder)
    heads = load_teacher_heads(folder, teacher="dino")      # teacher: with several teachers
    features = heads(student(pixel_values, output_hidden_states=True).hidden_states)
    features[23]                                            # B×N×D_teacher, teacher block 23
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .layout import CONFIG_FILE, DISTILLATION_DIR, HEADS_FILE, NORMALIZATION_PREFIX, distilled_teachers
from .normalization import TargetNormalization


class TeacherHeads(nn.Module):
    """Per distilled teacher block: the student block it reads, a projector, and the teacher's
    inverse target normalisation (identity when its targets were not normalised)."""

    def __init__(self, teacher_layers: list[int], student_layers: list[int], projectors: list[nn.Linear], normalizations: list[TargetNormalization] | None):
        super().__init__()
        self.teacher_layers, self.student_layers = list(teacher_layers), list(student_layers)
        self.projectors = nn.ModuleList(projectors)
        self.normalizations = None if normalizations is None else nn.ModuleList(normalizations)

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> dict[int, torch.Tensor]:
        """`hidden_states`: the student's `output_hidden_states=True` outputs (the embeddings, then
        each block's output) → {teacher block: B×N×D_teacher features in the teacher's space}."""
        features = {}
        for index, (teacher_layer, student_layer) in enumerate(zip(self.teacher_layers, self.student_layers)):
            projected = self.projectors[index](hidden_states[student_layer + 1])
            features[teacher_layer] = projected if self.normalizations is None else self.normalizations[index].inverse(projected)
        return features


def load_teacher_heads(student_dir: str | Path, teacher: str | None = None) -> TeacherHeads:
    """The heads of one teacher of the student saved in `student_dir` (see the module docstring);
    `teacher` names it when the student learnt from several. Weights from safetensors only."""
    folder = Path(student_dir) / DISTILLATION_DIR
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"student_dir: {student_dir} has no {DISTILLATION_DIR}/{CONFIG_FILE}; give the folder of a distilled student")
    summary = json.loads((folder / CONFIG_FILE).read_text())
    teachers = distilled_teachers(summary)
    if list(teachers) == [None]:
        if teacher is not None:
            raise ValueError(f"teacher: this student learnt from one teacher; leave teacher unset (got {teacher!r})")
        entry = summary
    else:
        if teacher not in teachers:
            raise ValueError(f"teacher: must be one of {sorted(teachers)} (the teachers this student learnt from), got {teacher!r}")
        entry, folder = teachers[teacher], folder / teacher
    state = load_file(str(folder / HEADS_FILE))
    count = sum(1 for key in state if key.startswith("projectors.") and key.endswith(".weight"))
    if count == 0:
        raise ValueError(f"student_dir: the heads in {folder / HEADS_FILE} have no projectors (method {summary.get('method')!r})")
    projectors = []
    for index in range(count):
        weight, bias = state[f"projectors.{index}.weight"], state[f"projectors.{index}.bias"]
        projector = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
        projector.load_state_dict({"weight": weight, "bias": bias})
        projectors.append(projector)
    teacher_layers, student_layers = entry["teacher_layers"][:count], entry["student_layers"][:count]  # ViTKD: the last is generated
    normalizations = None
    if entry.get("normalization", "none") != "none":
        normalizations = []
        for layer in teacher_layers:
            prefix = f"{NORMALIZATION_PREFIX}{layer}."
            module = TargetNormalization(projectors[0].out_features)
            module.load_state_dict({key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)})
            normalizations.append(module)
    return TeacherHeads(teacher_layers, student_layers, projectors, normalizations).eval()
