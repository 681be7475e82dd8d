"""benchmarks/gpu_suite.py at `--pair tiny` on the CPU: the code a GPU run goes through (the same step,
clock interface, parts, budget, batch search and report), the files it writes, a budget that cuts, a
SIGTERM that stops it, and benchmarks/gpu_run.sh, the one command a GPU machine runs."""

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MODES = ["reference", "fp32", "bf16", "bf16-compiled"]
# Seconds on 2 cores: tiny models, few steps; the eager backend still goes through torch.compile.
TINY = ["--pair", "tiny", "--device", "cpu", "--batch_size", "4", "--teacher_batch", "4", "--warmup", "1",
        "--rounds", "2", "--teacher_steps", "1", "--search_steps", "1", "--data_images", "4",
        "--compile_backend", "eager", "--threads", "1", "--modes", *MODES]  # fmt: skip


@pytest.fixture(scope="module")
def suite():
    path = ROOT / "benchmarks" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_part_runs_writes_the_table_and_backs_off_after_out_of_memory(suite, tmp_path, monkeypatch):
    """A CPU has no recoverable out-of-memory error: batches above 8 raise the one the CUDA allocator raises,
    so the interleaved steps asked for at 16 run at 8, and the search finds 8."""
    real_step = suite.train_step

    def step_that_runs_out_of_memory(model, optimizer, pixels, mode, device):
        if pixels.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(model, optimizer, pixels, mode, device)

    monkeypatch.setattr(suite, "train_step", step_that_runs_out_of_memory)
    monkeypatch.setattr(sys.modules["step"], "train_step", step_that_runs_out_of_memory)  # the interleaved steps'
    threads = torch.get_num_threads()
    results = suite.main([*TINY, "--batch_size", "16", "--max_batch", "32", "--output_dir", str(tmp_path)])
    assert torch.get_num_threads() == threads  # --threads 1 held for the run only

    parts = results["parts"]
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(suite.PARTS, "done")
    assert json.loads((tmp_path / "results.json").read_text())["parts"]["batch_search"] == parts["batch_search"]
    modes = parts["steps"]["modes"]
    assert list(modes) == MODES and parts["steps"]["rounds"] == 2
    assert parts["steps"]["out_of_memory_at"] == [16] and parts["steps"]["batch_size"] == 8
    flops = suite.step_flops(suite.PAIRS["tiny"], 8)
    for row in modes.values():
        seconds = row["ms_per_step"] / 1e3
        assert row["batch_size"] == 8
        assert row["images_per_s"] == pytest.approx(8 / seconds) and row["tflops"] == pytest.approx(flops / seconds / 1e12)
        assert row["min_ms"] <= row["ms_per_step"] <= row["max_ms"]
        assert row["peak_share"] is None and row["peak_memory_mib"] is None  # a CPU: no bf16 peak, no allocator
    # Same initial weights, same batch: the reference computes fp32's losses; bf16 stays within its targets.
    assert modes["reference"]["loss_deviation"]["total"] < 1e-5 and modes["fp32"]["loss_deviation"] is None
    assert modes["bf16"]["losses_agree"] and modes["bf16-compiled"]["losses_agree"]
    assert modes["bf16"]["losses"].keys() == {"total", "kd", "outlier", "info"}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled mode compiled

    # Three students in one pass against each alone, in bf16; each trains exactly as alone: equal first losses.
    students = parts["students"]
    assert students["mode"] == "bf16" and list(students["groups"]) == ["same", "family"]
    flops, teacher = suite.step_flops(suite.PAIRS["tiny"], 1), suite.step_flops(suite.PAIRS["tiny"], 1, teacher_only=True)
    for name, group in students["groups"].items():
        assert group["batch_size"] == 8 and group["rounds"] == 2 and group["losses_equal"]
        totals = [losses["alone"] for losses in group["losses"].values()]
        assert all(losses["group"] == losses["alone"] for losses in group["losses"].values()) and len(set(totals)) == 3  # three different students
        assert set(group["rows"]) == {"group", "student0 alone", "student1 alone", "student2 alone", "separate"}
        assert group["rows"]["separate"]["ms_per_step"] >= max(group["rows"][f"student{i} alone"]["ms_per_step"] for i in range(3))
    same = students["groups"]["same"]
    assert same["same_students"] and same["time_ratios"]["one"] == pytest.approx(3 * same["time_ratios"]["separate"])
    # The group count agrees with the one-student step's: one teacher forward, three students' work.
    assert same["flop_ratios"]["separate"] == pytest.approx((teacher + 3 * (flops - teacher)) / (3 * flops))
    assert same["flop_ratios"]["one"] == pytest.approx((teacher + 3 * (flops - teacher)) / flops)
    family = students["groups"]["family"]
    assert not family["same_students"] and family["flop_ratios"]["student0 alone"] > family["flop_ratios"]["student2 alone"] > 1

    assert set(parts["teacher"]["rows"]) == {"eager", "compiled"}
    assert all(row["batch_size"] == 4 and row["images_per_s"] > 0 for row in parts["teacher"]["rows"].values())
    search = parts["batch_search"]
    assert search["mode"] == max(modes, key=lambda name: modes[name]["images_per_s"])
    assert [(trial["batch_size"], trial["fits"]) for trial in search["trials"]] == [(8, True), (16, False)]
    assert (search["largest_fitting"], search["smallest_failing"]) == (8, 16)
    per_worker = parts["data"]["per_worker"]
    assert set(per_worker) == {"map-style uint8", "streaming uint8"} and all(r["images_per_s"] > 0 for r in per_worker.values())

    table = (tmp_path / "results.md").read_text()
    for label in ["reference step (official-like, fp32)", "this step, fp32", "this step, bf16", "this step, bf16, blocks compiled",
                  "teacher forward alone, bf16, eager", "teacher forward alone, bf16, compiled"]:  # fmt: skip
        assert f"| {label} |" in table
    assert ", largest that fits | 8 |" in table and "tried 8, 16 (out of memory)" in table
    assert "(out of memory at batch 16 first)" in table
    assert "| 3 students in one pass (same: 3 × width 32 singer), bf16 | 8 |" in table
    assert "| 3 students in one pass (family: width 32 singer, width 64 singer, width 128 singer), bf16 | 8 |" in table
    assert table.count("| the same 3 students, 3 separate steps, bf16 | 8 |") == 2
    ratio, (low, high) = same["time_ratios"]["separate"], same["time_ratio_ranges"]["separate"]
    assert low <= ratio <= high
    assert (f"same: the group's step {ratio:.3f}× its 3 separate steps' time ({low:.3f}–{high:.3f} over the rounds; "
            f"FLOP count {same['flop_ratios']['separate']:.3f}×)") in table  # fmt: skip
    assert "losses in the group and alone equal (largest difference 0)" in table
    assert "on CPU:" in table and "| peak unknown |" in table
    fastest = max([row["images_per_s"] for row in modes.values()] + [t["images_per_s"] for t in search["trials"] if t["fits"]])
    assert f"map-style uint8 {math.ceil(fastest / per_worker['map-style uint8']['images_per_s'])}," in table
    assert str(tmp_path) not in table  # no local path in what gets copied into docs/performance.md


def test_a_spent_budget_cuts_the_steps_after_one_round_and_skips_the_rest(suite, tmp_path):
    results = suite.main([*TINY, "--rounds", "50", "--budget_s", "0", "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    steps = saved["parts"]["steps"]
    assert steps["status"] == "cut" and steps["rounds"] == 1 and steps["reason"] == "time share spent after 1 of 50 timed rounds"
    assert list(steps["modes"]) == MODES
    for name in ["students", "teacher", "data", "batch_search"]:
        assert saved["parts"][name] == {"status": "skipped", "reason": "budget spent before this part"}
    assert saved["parts"] == json.loads(json.dumps(results["parts"]))
    assert "steps cut (time share spent after 1 of 50 timed rounds)" in (tmp_path / "results.md").read_text()


def test_sigterm_stops_the_run_and_keeps_what_was_measured(suite, tmp_path):
    class Unhandled(BaseException):
        pass

    def unhandled(signum, frame):  # reached only if the suite installed no handler of its own
        raise Unhandled

    previous = signal.signal(signal.SIGTERM, unhandled)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(SystemExit, match="stopped by signal 15"):
            suite.main([*TINY, "--modes", "reference", "fp32", "--rounds", "100000", "--output_dir", str(tmp_path)])
        assert signal.getsignal(signal.SIGTERM) is unhandled  # put back
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert parts["steps"]["status"] == "cut" and "stopped by signal 15" in parts["steps"]["reason"]
    assert all(parts[name]["status"] == "skipped" for name in ["students", "teacher", "data", "batch_search"])
    assert "steps cut (stopped by signal 15" in (tmp_path / "results.md").read_text()


def test_the_batch_search_doubles_then_bisects_to_within_an_eighth(suite):
    tried = []

    def fits_up_to(limit):
        def fits(batch):
            tried.append(batch)
            return batch <= limit

        return fits

    low, high, cut = suite.largest_batch(fits_up_to(1000), 128, 65536, math.inf)
    assert tried[:4] == [128, 256, 512, 1024] and cut is None
    assert low <= 1000 < high and high - low <= low // 8 and low % 8 == 0
    tried.clear()
    assert suite.largest_batch(fits_up_to(1000), 128, 300, math.inf) == (300, None, None) and tried == [128, 256, 300]
    tried.clear()
    low, high, cut = suite.largest_batch(fits_up_to(1000), 128, 65536, deadline=0.0)
    assert (low, high, tried) == (128, None, [128]) and cut.startswith("time share spent")


def test_each_part_gets_its_share_of_the_time_left(suite):
    names = list(suite.PARTS)
    first = suite.part_deadline(100.0, 200.0, names[0], names)
    assert first == pytest.approx(100.0 + 100.0 * suite.SHARES[names[0]] / sum(suite.SHARES.values()))
    assert suite.part_deadline(150.0, 200.0, names[-1], names[-1:]) == 200.0  # the last part gets all that is left
    assert suite.part_deadline(250.0, 200.0, names[1], names[1:]) == 250.0  # none left: stop after the first unit


def test_known_gpus_get_their_dense_bf16_peak_and_others_none(suite):
    assert suite.known_peak("NVIDIA H200")[0] == suite.known_peak("NVIDIA H100 80GB HBM3")[0]
    assert suite.known_peak("NVIDIA H100 PCIe")[0] < suite.known_peak("NVIDIA H100 80GB HBM3")[0]
    assert suite.known_peak("NVIDIA A100-SXM4-80GB")[0] == suite.known_peak("NVIDIA A100 80GB PCIe")[0]
    for other in ["NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA GH200 480GB", "NVIDIA L40", "NVIDIA B200"]:
        assert suite.known_peak(other) == (None, "peak unknown")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pair", "vit-h"], "--pair: must be one of"),
        (["--modes", "bf16", "teacher-bf16"], "--modes: give some of"),
        (["--device", "cuda"], "--device cuda: no CUDA device here"),
        (["--max_batch", "2"], "--max_batch: must be at least --batch_size (4), got 2"),
        (["--data_json", "nowhere.json"], "--data_json: nowhere.json does not exist"),
        (["--students", "same", "trio"], "--students: give some of ['same', 'family', 'methods']"),
        (["--students_mode", "reference"], "--students_mode: must be one of ['fp32', 'bf16-autocast', 'bf16'"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_anything_is_built(suite, tmp_path, capsys, argv, message):
    if argv[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit) as exit_info:
        suite.run_cli(suite.main, [*TINY, *argv, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_gpu_run_wrapper_leaves_the_results_and_its_log_in_OUT(tmp_path):
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "SINGER_GPU_WHEELS": str(tmp_path / "no-wheels")}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), *TINY, "--modes", "fp32", "--budget_s", "0"],
                         env=environment, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(path.name for path in out.iterdir()) == ["log.txt", "results.json", "results.md"]
    log = (out / "log.txt").read_text()
    assert "== torch " in log and "| this step, fp32 |" in log  # versions first, the table last
    assert json.loads((out / "results.json").read_text())["parts"]["steps"]["status"] == "cut"


def test_the_step_benchmark_still_prints_its_table(capsys):
    """benchmarks/step.py's command line, whose machinery the suite reuses, as docs/performance.md shows it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    step.main(["--pair", "tiny", "--batch_size", "2", "--steps", "2", "--warmup", "0", "--modes", "reference", "fp32", "teacher-bf16"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["mode", "ms/step", "min-max", "images/s", "TFLOP/s", "%", "of", "limit", "peak", "MiB"]
    assert [line.split()[0] for line in lines[2:5]] == ["reference", "fp32", "teacher-bf16"]
    assert any(line.startswith("  fp32: ") and "the reference's time" in line for line in lines)
    agreement = [line for line in lines if line.startswith("  reference: total ")]
    assert len(agreement) == 1 and agreement[0].endswith("PASS")


def test_the_step_benchmark_times_students_in_one_pass_against_each_alone(capsys):
    """`step.py --students`: one model training the three methods' students against each one's own step;
    each student's first losses are the same in the group as alone."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    step.main(["--pair", "tiny", "--students", "methods", "--batch_size", "2", "--steps", "2", "--warmup", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert "student0 (32, 4, 2) singer, student1 (32, 4, 2) fitnet, student2 (32, 4, 2) vitkd" in lines[1]
    assert [line.split()[0] for line in lines[3:8]] == ["group", "student0", "student1", "student2", "3"]
    bound = step.flop_ratios(step.PAIRS["tiny"], step.GROUPS["methods"])["separate"]
    assert any(line.startswith("  3 separate steps: ") and line.endswith(f"; FLOPs {bound:.3f}x)") for line in lines)
    totals = [re.fullmatch(r"  student\d: total (\S+) and (\S+), (\S+) apart", line) for line in lines]
    totals = [match.groups() for match in totals if match]
    assert len(totals) == 3 and all(group == alone and gap == "0" for group, alone, gap in totals)
    assert len({group for group, _, _ in totals}) == 3  # three different students
    assert lines[-1] == "  equal (every term within 1e-06 of its value): PASS"
    with pytest.raises(SystemExit, match="--modes: with --students, give one of"):
        step.main(["--pair", "tiny", "--students", "same", "--modes", "fp32", "bf16"])
