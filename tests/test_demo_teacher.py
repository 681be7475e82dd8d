"""singer_hf.demo.teacher, which the demo and the evidence study build their teachers with."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from singer_hf.demo.teacher import DemoTeacherArguments, train_demo_teacher


def test_the_same_seed_gives_the_same_teacher_whatever_ran_before(tmp_path):
    weights = []
    for run in (0, 1):
        torch.manual_seed(1000 + run)  # what ran before in the process must not matter
        output = tmp_path / f"run{run}"
        arguments = DemoTeacherArguments(
            output_dir=str(output), max_steps=2, batch_size=16, max_train_samples=64, max_test_samples=64, bf16=False
        )
        train_demo_teacher(arguments)
        weights.append(load_file(str(output / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
