"""benchmarks/evidence.py end to end at smoke size: both teachers, every student, the tables and the
figures, and a second call that resumes from the kept results instead of training again."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SMOKE = ["--seeds", "1", "--student_steps", "2", "--base_teacher_steps", "2", "--finetune_steps", "2",
         "--probe_images", "100", "--stats_images", "200", "--train_images", "4000", "--teacher_test_images", "200",
         "--workers", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def evidence():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "evidence.py"
    spec = importlib.util.spec_from_file_location("evidence", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_the_study_runs_every_student_and_resumes(evidence, tmp_path):
    output = tmp_path / "evidence"
    threads = torch.get_num_threads()
    report = evidence.main([*SMOKE, "--output_dir", str(output)])
    assert torch.get_num_threads() == threads  # the process is left as it was (later tests compare runs bit for bit)
    expected = {f"{t}-{s}-seed0" for t in evidence.TEACHERS for s in evidence.STUDENTS} | {f"{b}-seed0" for b in evidence.BASELINES}
    assert {run["name"] for run in report["runs"]} == expected
    assert all(0 <= run["linear_probe"] <= 1 for run in report["runs"])
    singer = next(run for run in report["runs"] if run["name"] == "artifact-singer-seed0")
    assert set(singer["refinement"]) == {"4", "5"} and singer["refinement"]["4"]["info_error"] >= 0
    planted = report["teachers"]["artifact"]["planted"]
    assert planted["block"] == 2 and report["teachers"]["natural"]["planted"] is None
    table = (output / "evidence.md").read_text()
    for title, _ in evidence.STUDENTS.values():
        assert f"| {title} |" in table
    assert (output / "norm_maps.png").stat().st_size > 0 and (output / "norm_histograms.png").stat().st_size > 0
    assert json.loads((output / "evidence.json").read_text())["summary"].keys() == {*evidence.STUDENTS, *evidence.BASELINES}

    # A second call trains nothing: the teachers and every run's result are read back.
    # The five distilled students of each teacher trained in one run (a folder each), the baselines alone.
    assert {path.parent.name for path in (output / "runs").glob("*-seed0/*/result.json")} == set(evidence.STUDENTS)
    stamps = {path: path.stat().st_mtime_ns for path in (output / "runs").rglob("result.json")}
    assert len(stamps) == len(expected)
    again = evidence.main([*SMOKE, "--output_dir", str(output)])
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    assert [run["linear_probe"] for run in again["runs"]] == [run["linear_probe"] for run in report["runs"]]


def test_bad_arguments_fail_before_anything_is_trained(evidence, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evidence.run_cli(evidence.main, ["--artifact_ratio", "3", "--output_dir", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "artifact_ratio: must be above the outlier cut-off 4.0, got 3.0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
