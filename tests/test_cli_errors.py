"""Bad input to scripts/distill.py fails fast, in one line on stderr, naming the argument.

Each case runs the script's real entry point (`run_cli(main)`) in-process; a spy on
`PreTrainedModel.from_pretrained` proves no model weights were loaded before the error.
"""

import io
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import transformers
from conftest import IMAGE, PATCH, make_vit

from singer_hf.cli import StrictArgumentParser, UsageError, run_cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "distill.py"
STUDENT = "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_vit(seed=0).save_pretrained(root / "teacher")
    transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(root / "teacher")
    make_vit(seed=0).save_pretrained(root / "bare_teacher")  # no preprocessor_config.json
    big = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=PATCH)
    transformers.ViTConfig(image_size=2 * IMAGE, **big).save_pretrained(root / "big_student")  # config only: no weights
    png = io.BytesIO()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    data = datasets.Dataset.from_dict({"img": [{"bytes": png.getvalue(), "path": None}] * 4, "label": [0, 1, 2, 3]})
    data.cast_column("img", datasets.Image()).to_parquet(str(root / "data.parquet"))
    (root / "unknown_key.yaml").write_text("rank: 4\nrnak: 4\n")
    (root / "list.yaml").write_text("- rank\n- 4\n")
    (root / "broken.yaml").write_text("rank: [4\n")
    (root / "good.yaml").write_text("rank: 4\n")
    students = {
        "same_names": "- {name: a, rank: 4}\n- {name: a, method: fitnet}\n",
        "unknown_field": "- {name: a, rnak: 4}\n",
        "layer_past_the_teacher": "- {name: a}\n- {name: b, method: fitnet, teacher_layers: [2, 9]}\n",
        "two_models": f"- {{name: a, student_size: tiny, student_name_or_path: {root / 'teacher'}}}\n",
        "bad_name": "- {name: a/b}\n",
        "rank_zero": "- {name: a, rank: 0}\n",
        "big_student": f"- {{name: a}}\n- {{name: b, student_name_or_path: {root / 'big_student'}}}\n",
        "not_a_list": "name: a\n",
    }
    for name, text in students.items():
        (root / f"students_{name}.yaml").write_text(text)
    (root / "students_recipe.yaml").write_text("students:\n  - name: a\n    rank: 4\n  - name: b\n    methd: fitnet\n")
    (root / "used_output").mkdir()
    (root / "used_output" / "model.safetensors").write_bytes(b"an earlier result")
    return root


def _argv(root: Path, tmp_path: Path) -> list[str]:
    return [
        "--teacher_name_or_path", str(root / "teacher"), "--student_size", "tiny",
        "--student_config_overrides", STUDENT, "--dataset_name", str(root / "data.parquet"),
        "--image_column", "img", "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
        "--report_to", "none", "--rank", "4",
    ]  # fmt: skip


def _set(argv: list[str], flag: str, *values: str) -> list[str]:
    """argv with `flag` given `values` (replacing its current value when present)."""
    if flag in argv:
        index = argv.index(flag)
        return argv[:index] + [flag, *values] + argv[index + 2 :]
    return [*argv, flag, *values]


def _drop(argv: list[str], flag: str) -> list[str]:
    index = argv.index(flag)
    return argv[:index] + argv[index + 2 :]


# (case id, argv edit, the argument the one-line error must name)
CASES = [
    ("method typo", lambda a, r: _set(a, "--method", "singerr"), "method: must be one of"),
    ("rank zero", lambda a, r: _set(a, "--rank", "0"), "rank"),
    ("rank not an int", lambda a, r: _set(a, "--rank", "four"), "--rank"),
    ("quantile out of range", lambda a, r: _set(a, "--outlier_quantile", "1.5"), "outlier_quantile"),
    ("negative threshold", lambda a, r: _set(a, "--null_threshold", "-1"), "null_threshold"),
    ("duplicate layers", lambda a, r: _set(a, "--teacher_layers", "3", "3"), "teacher_layers"),
    ("negative layer", lambda a, r: _set(a, "--teacher_layers", "-1", "5"), "teacher_layers"),
    ("layer past the teacher", lambda a, r: _set(a, "--teacher_layers", "2", "9"), "teacher_layers"),
    ("mask ratio zero", lambda a, r: _set(a, "--mask_ratio", "0"), "mask_ratio"),
    ("negative weight", lambda a, r: _set(a, "--kd_weight", "-1"), "kd_weight"),
    ("adapter init typo", lambda a, r: _set(a, "--adapter_init", "zeros"), "--adapter_init"),
    ("batch size zero", lambda a, r: _set(a, "--per_device_train_batch_size", "0"), "per_device_train_batch_size"),
    ("negative learning rate", lambda a, r: _set(a, "--learning_rate", "-1e-3"), "learning_rate"),
    ("zero epochs", lambda a, r: _set(_drop(a, "--max_steps"), "--num_train_epochs", "0"), "num_train_epochs"),
    ("abbreviated flag", lambda a, r: _set(_drop(a, "--max_steps"), "--max_step", "5"), "--max_step"),
    ("unknown flag", lambda a, r: _set(a, "--ranks", "4"), "--ranks"),
    ("bad boolean", lambda a, r: _set(a, "--streaming", "maybe"), "--streaming"),
    ("student size typo", lambda a, r: _set(a, "--student_size", "huge"), "--student_size"),
    ("two students", lambda a, r: _set(a, "--student_name_or_path", str(r / "teacher")), "student_name_or_path"),
    ("no student", lambda a, r: _drop(_drop(a, "--student_size"), "--student_config_overrides"), "student_name_or_path"),
    ("missing teacher folder", lambda a, r: _set(a, "--teacher_name_or_path", str(r / "teachr")), "teacher_name_or_path"),
    ("missing relative teacher", lambda a, r: _set(a, "--teacher_name_or_path", "./teachr"), "teacher_name_or_path"),
    ("missing dataset file", lambda a, r: _set(a, "--dataset_name", str(r / "missing.parquet")), "dataset_name"),
    ("missing student folder", lambda a, r: _set(_drop(a, "--student_size"), "--student_name_or_path", str(r / "x")), "student_name_or_path"),
    ("teacher without processor", lambda a, r: _set(a, "--teacher_name_or_path", str(r / "bare_teacher")), "preprocessor_config.json"),
    ("incompatible student", lambda a, r: _set(_drop(a, "--student_size"), "--student_name_or_path", str(r / "big_student")), "student_name_or_path: the student is built for 64px"),
    ("negative shuffle buffer", lambda a, r: _set(a, "--shuffle_buffer", "-1"), "shuffle_buffer"),
    ("streaming without max_steps", lambda a, r: _set(_drop(a, "--max_steps"), "--streaming", "true"), "max_steps"),
    ("wrong image column", lambda a, r: _set(a, "--image_column", "picture"), "image_column"),
    ("non-image column", lambda a, r: _set(a, "--image_column", "label"), "image_column='label' holds"),
    ("unknown recipe key", lambda a, r: [*a, str(r / "unknown_key.yaml")], "rnak"),
    ("recipe not a mapping", lambda a, r: [str(r / "list.yaml"), *a], "config file"),
    ("broken recipe", lambda a, r: [str(r / "broken.yaml"), *a], "config file"),
    ("missing recipe", lambda a, r: [*a, str(r / "missing.yaml")], "config file"),
    ("two recipes", lambda a, r: [str(r / "good.yaml"), *a, str(r / "good.yaml")], "config file"),
    ("two students with one name", lambda a, r: _set(a, "--students", str(r / "students_same_names.yaml")), "students: two entries are named 'a'"),
    ("unknown student field", lambda a, r: _set(a, "--students", str(r / "students_unknown_field.yaml")), "rnak: unknown key in students entry 'a'; did you mean 'rank'?"),
    ("unknown field in a recipe's students", lambda a, r: [str(r / "students_recipe.yaml"), *a], "methd: unknown key in students entry 'b'; did you mean 'method'?"),
    ("student layer past the teacher", lambda a, r: _set(a, "--students", str(r / "students_layer_past_the_teacher.yaml")), "students entry 'b': teacher_layers"),
    ("student with two models", lambda a, r: _set(a, "--students", str(r / "students_two_models.yaml")), "student_name_or_path / student_size (student 'a'): give exactly one"),
    ("student name with a slash", lambda a, r: _set(a, "--students", str(r / "students_bad_name.yaml")), "students: entry 1 needs a name"),
    ("student rank zero", lambda a, r: _set(a, "--students", str(r / "students_rank_zero.yaml")), "students entry 'a': rank"),
    ("student too big for the images", lambda a, r: _set(a, "--students", str(r / "students_big_student.yaml")), "students entry 'b': student_name_or_path: the student is built for 64px"),
    ("students not a list", lambda a, r: _set(a, "--students", str(r / "students_not_a_list.yaml")), "students: "),
    ("missing students file", lambda a, r: _set(a, "--students", str(r / "students_missing.yaml")), "students: "),
    ("bad image share", lambda a, r: _set(a, "--max_bad_image_share", "1.5"), "max_bad_image_share"),
    ("negative non-finite limit", lambda a, r: _set(a, "--max_nonfinite_steps", "-1"), "max_nonfinite_steps"),
    ("non-empty output_dir", lambda a, r: _set(a, "--output_dir", str(r / "used_output")), "output_dir"),
    ("missing checkpoint", lambda a, r: _set(a, "--resume_from_checkpoint", str(r / "checkpoint-9")), "resume_from_checkpoint"),
    ("nothing to resume", lambda a, r: _set(a, "--resume_from_checkpoint", "true"), "resume_from_checkpoint"),
    ("not a checkpoint", lambda a, r: _set(a, "--resume_from_checkpoint", str(r / "teacher")), "resume_from_checkpoint"),
]


@pytest.mark.parametrize("edit, argument", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_fails_fast_in_one_line(distill, workspace, tmp_path, capsys, monkeypatch, edit, argument):
    loaded = []
    original = transformers.PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(spy))
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(distill.main, edit(_argv(workspace, tmp_path), workspace))
    elapsed = time.perf_counter() - start
    stderr = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(stderr) == 1, stderr
    assert stderr[0].startswith("error: ") and argument in stderr[0] and "Traceback" not in stderr[0]
    assert not loaded, f"{loaded} loaded weights before the error"
    assert elapsed < 5, f"took {elapsed:.1f} s"


def test_recipe_anywhere_and_flags_win(distill, workspace, tmp_path):
    argv = _argv(workspace, tmp_path)
    for position in (0, len(argv)):
        with_recipe = argv[:position] + [str(workspace / "good.yaml")] + argv[position:]
        _, _, training_args = distill.parse_arguments(_set(with_recipe, "--rank", "8"))
        assert training_args.rank == 8  # the flag beats the recipe's 4, before or after it
        _, _, training_args = distill.parse_arguments(_drop(with_recipe, "--rank"))
        assert training_args.rank == 4


@dataclass
class RecipeArguments:
    name: str = field(metadata={"help": "Required: a recipe may give it."})
    limit: int | None = 5
    options: dict | str | None = None
    layers: list[int] = field(default_factory=lambda: [1])
    flag: bool = False
    rate: float = 0.1


def test_a_recipe_sets_the_parser_defaults_as_written(tmp_path):
    """`null` overrides a default and a mapping stays a mapping (nothing lost on the way through flags); the
    other values are typed as their flags would be; flags still win; a bad value is one line naming the key."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\nlimit: null\noptions: {a: 1.0e-4, b: [1, 2]}\nlayers: [3, '4']\nflag: true\nrate: 1e-3\n")
    (args,) = StrictArgumentParser(RecipeArguments).parse([str(recipe)])
    assert args == RecipeArguments(name="x", limit=None, options={"a": 1e-4, "b": [1, 2]}, layers=[3, 4], flag=True, rate=1e-3)
    (args,) = StrictArgumentParser(RecipeArguments).parse(["--limit", "7", str(recipe), "--layers", "9", "--flag", "false"])
    assert (args.limit, args.layers, args.flag, args.options) == (7, [9], False, {"a": 1e-4, "b": [1, 2]})
    for text, message in (("rate: fast", "rate: invalid float value: 'fast'"), ("layers: [1, b]", "layers: invalid int value: 'b'"),
                          ("name: [x, y]", "name: expected one value")):  # fmt: skip
        recipe.write_text(f"name: x\n{text}\n" if not text.startswith("name") else f"{text}\n")
        with pytest.raises(UsageError, match=re.escape(message)):
            StrictArgumentParser(RecipeArguments).parse([str(recipe)])


def test_default_image_processor_for_a_bare_teacher(distill, workspace, tmp_path):
    argv = _set(_argv(workspace, tmp_path), "--teacher_name_or_path", str(workspace / "bare_teacher"))
    model_args, _, _ = distill.parse_arguments([*argv, "--image_processor_name_or_path", "default"])
    processor = distill.load_image_processor(model_args.image_processor_name_or_path, model_args.teacher_name_or_path, make_vit(seed=0))
    assert isinstance(processor, transformers.ViTImageProcessor) and processor.size["height"] == IMAGE


def test_command_line_error_is_one_line(workspace, tmp_path):
    """The real command line: exit status 2 and exactly the one line."""
    command = [sys.executable, str(SCRIPT), *_set(_argv(workspace, tmp_path), "--rank", "0")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("SINGER_DEBUG", None)
    plain = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == ["error: rank: must be >= 1 (an integer), got 0 (run with --debug for the traceback)"]


@pytest.mark.parametrize("how", ["--debug", "SINGER_DEBUG=1"])
def test_debug_shows_the_traceback(distill, workspace, tmp_path, monkeypatch, how):
    argv = _set(_argv(workspace, tmp_path), "--rank", "0")
    if how == "--debug":
        argv.append("--debug")
    else:
        monkeypatch.setenv("SINGER_DEBUG", "1")
    with pytest.raises(ValueError, match="rank: must be >= 1"):  # raised, not turned into a line and an exit
        run_cli(distill.main, argv)


# -- answered before the heavy imports -----------------------------------------------------------------
# `python scripts/X.py --help` or a mistyped flag must not wait for torch, PEFT, datasets or transformers'
# model code: this wrapper runs a script as `python` would and reports which of them it imported.
HEAVY = ("torch", "peft", "datasets", "accelerate", "transformers.modeling_utils")
AS_SCRIPT = (
    "import atexit, runpy, sys\n"
    f"atexit.register(lambda: print('imported:', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def _run_script(script: str, *argv: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    environment.pop("SINGER_DEBUG", None)
    return subprocess.run([sys.executable, "-c", AS_SCRIPT, str(ROOT / "scripts" / script), *argv],
                          capture_output=True, text=True, env=environment, timeout=120)  # fmt: skip


def test_help_comes_before_torch_with_the_distillation_arguments_first():
    run = _run_script("distill.py", "--help")
    assert run.returncode == 0 and run.stderr.strip() == "imported: []", run.stderr[-2000:]
    titles = [line[:-1] for line in run.stdout.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles[:4] == ["options", "models", "data", "distillation"] and titles[-1] == "training: the other transformers.TrainingArguments"
    flags = run.stdout.index
    assert flags("--teacher_name_or_path") < flags("--dataset_name") < flags("--rank") < flags("--learning_rate") < flags("--gradient_accumulation_steps")
    assert "--no_dataloader_pin_memory" in run.stdout and "--report_to" in run.stdout  # all of TrainingArguments


@pytest.mark.parametrize("script, argv, message", [
    ("distill.py", ["--teacher_name_or_path", "t", "--lerning_rate", "1e-3"], "--lerning_rate: unknown argument; did you mean --learning_rate?"),
    ("distill.py", ["--per_device_train_bach_size", "8"], "--per_device_train_bach_size: unknown argument; did you mean --per_device_train_batch_size?"),
    ("push_to_hub.py", ["runs/x", "--repo-idd", "me/x"], "--repo-idd: unknown argument; did you mean --repo_id?"),
])  # fmt: skip
def test_a_mistyped_flag_gets_the_closest_one_before_torch(script, argv, message):
    run = _run_script(script, *argv)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {message} (run with --debug for the traceback)", "imported: []"]


def test_push_to_hub_help_comes_before_torch():
    run = _run_script("push_to_hub.py", "--help")
    assert run.returncode == 0 and "--include_distillation" in run.stdout and run.stderr.strip() == "imported: []"


def test_an_unreachable_hub_fails_in_one_line_naming_the_id(workspace, tmp_path):
    """A Hub id while the Hub does not answer: one line suggesting HF_HUB_OFFLINE=1, before torch is imported,
    instead of half a minute of retry warnings."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    argv = _set(_argv(workspace, tmp_path), "--teacher_name_or_path", "google/vit-base-patch16-224")
    run = _run_script("distill.py", *argv, HF_ENDPOINT=f"http://127.0.0.1:{closed}", HF_HUB_OFFLINE="0")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: teacher_name_or_path: google/vit-base-patch16-224 is a Hub id, but the Hub at http://127.0.0.1:{closed} "
        "does not answer (ConnectError); if it is in your cache, set HF_HUB_OFFLINE=1, else give a local folder "
        "(run with --debug for the traceback)",
        "imported: []",
    ]


def test_trainer_flags_read_from_the_source_are_transformers_own():
    """The flags answered before the import are exactly the fields `HfArgumentParser` makes of `TrainingArguments`."""
    import dataclasses

    from singer_hf.cli import source_fields

    read = source_fields("transformers.training_args", "TrainingArguments")
    real = [f for f in dataclasses.fields(transformers.TrainingArguments) if f.init]
    assert [f.name for f in read] == [f.name for f in real]
    assert {f.name for f in read if f.negatable} == {f.name for f in real if f.default is True and f.type in (bool, bool | None)}


def test_importing_the_package_needs_no_torch_and_still_registers_the_peft_type():
    code = (
        "import sys\n"
        "import singer_hf, singer_hf.cli\n"
        "assert 'torch' not in sys.modules and 'peft' not in sys.modules\n"
        "import peft\n"  # imported after singer_hf, as the model card's recipe may do
        "assert 'SINGER' in peft.utils.PeftType.__members__\n"
        "assert singer_hf.SingerConfig.__module__ == 'singer_hf.tuner.config'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
