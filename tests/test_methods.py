"""Methods are objects found by name: a fourth method, written here alone, trains through the script."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from standins import hf_families, write_images

from singer_hf.methods import METHODS, DistillationMethod, get_method, register_method

STUDENT = "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64"


class CosineKD(DistillationMethod):
    """1 − cosine similarity between the projected student tokens and the teacher's, on the last block."""

    name = "cosine"
    label = "Cosine KD"
    summary = "The student's projected tokens are pulled towards the direction of the teacher's."
    heads_description = "one linear projector."
    loss_weights = {"cosine": ("kd_weight", 2.0)}

    def __init__(self, config, teacher, student, teacher_layers, student_layers):
        super().__init__(config, teacher, student, teacher_layers, student_layers)
        self.projectors = self.make_projectors(len(teacher_layers))

    @staticmethod
    def default_layers(depth):
        return [depth - 1]

    def losses(self, teacher_features, student_features):
        student, teacher = self.alignment(student_features[self.student_layers[0]], teacher_features[self.teacher_layers[0]])
        return {"cosine": 1 - F.cosine_similarity(self.projectors[0](student), teacher, dim=-1).mean()}


@pytest.fixture
def cosine():
    register_method(CosineKD)
    yield CosineKD
    METHODS.pop(CosineKD.name)


def test_a_method_registered_elsewhere_trains_through_the_script(distill, cosine, tmp_path):
    teacher = tmp_path / "teacher"
    hf_families()["vit"](teacher)
    data = write_images(tmp_path / "train.parquet", count=16)
    output = tmp_path / "run"
    result = distill.main([
        "--teacher_name_or_path", str(teacher), "--student_size", "tiny", "--student_config_overrides", STUDENT,
        "--dataset_name", str(data), "--output_dir", str(output), "--max_steps", "3", "--method", "cosine",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
    ])  # fmt: skip
    logs = [entry for entry in json.loads((output / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert set(result["losses"]) == {"loss", "loss_cosine"}
    # The method's own default weight (2) multiplies its term, as for the built-in methods.
    assert all(entry["loss"] == pytest.approx(2 * entry["loss_cosine"], rel=1e-5) for entry in logs)
    config = json.loads((output / "distillation" / "distillation_config.json").read_text())
    assert config["method"] == "cosine" and config["teacher_layers"] == [5]
    card = (output / "README.md").read_text()
    assert "Cosine KD" in card and cosine.summary in card
    student = transformers.AutoModel.from_pretrained(output)
    assert torch.isfinite(next(student.parameters())).all()


def test_unknown_and_duplicate_methods_are_one_line_errors(cosine):
    with pytest.raises(ValueError, match=r"^method: must be one of \['cosine', 'fitnet', 'singer', 'vitkd'\], got 'crd'$"):
        get_method("crd")

    class Other(CosineKD):
        pass

    with pytest.raises(ValueError, match="method: a method named 'cosine' is already registered"):
        register_method(Other)
