"""The commands README.md and docs/*.md show: every program, recipe and config they name exists, and
every flag they pass is one that program accepts (read from its own --help). Links between the pages
resolve. The commands themselves run in the tests of each program."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = {"scripts/evaluate.py": "evaluate", "scripts/diagnose.py": "diagnose", "scripts/push_to_hub.py": "push_to_hub",
            "scripts/export_onnx.py": "export_onnx"}  # fmt: skip


INLINE_COMMAND = re.compile(r"`((?:\w+=\S+ )*(?:python|accelerate launch|bash) [^`]+)`")


def shown_commands() -> list[tuple[str, list[str]]]:
    """(page, tokens) of every command line in the pages' bash blocks (continuation lines joined) and of
    every inline command (`python ...`, as in the tables)."""
    commands = []
    for page in PAGES:
        text = page.read_text()
        lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL) for line in block.replace("\\\n", " ").splitlines()]
        for line in [*lines, *INLINE_COMMAND.findall(re.sub(r"```.*?```", "", text, flags=re.DOTALL))]:
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append((page.relative_to(ROOT).as_posix(), tokens))
    return commands


def _load_benchmark(path: Path):
    spec = importlib.util.spec_from_file_location(f"shown_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def accepted_flags(distill):
    """Program path -> the flags its --help lists, asked in this process (imports shared: seconds, not minutes)."""
    cache = {}

    def flags(program: str, capsys) -> set[str]:
        if program not in cache:
            if program in ("scripts/distill.py", "scripts/demo.py"):  # the demo passes its flags to distill.py
                main = distill.check_command_line
            elif program in COMMANDS:
                main = importlib.import_module(f"singer_hf.commands.{COMMANDS[program]}").main
            else:
                main = _load_benchmark(ROOT / program).main
            capsys.readouterr()
            with pytest.raises(SystemExit) as exit_info:
                main(["--help"])
            assert exit_info.value.code in (0, None), program
            cache[program] = set(re.findall(r"--[A-Za-z][\w-]*", capsys.readouterr().out))
        return cache[program]

    return flags


def test_the_pages_show_commands():
    programs = {token for _, tokens in shown_commands() for token in tokens if token.endswith(".py")}
    assert {"scripts/distill.py", "scripts/evaluate.py", "scripts/diagnose.py", "scripts/push_to_hub.py",
            "scripts/export_onnx.py", "scripts/demo.py", "benchmarks/step.py", "benchmarks/evidence.py"} <= programs  # fmt: skip


def test_every_shown_command_names_files_that_exist_and_flags_its_program_accepts(accepted_flags, capsys):
    checked = 0
    for page, tokens in shown_commands():
        for token in tokens:
            if re.fullmatch(r"(scripts|benchmarks|configs|accelerate_configs)/[\w./-]+", token):
                assert (ROOT / token).is_file(), f"{page}: {token} does not exist"
        program = next((token for token in tokens if re.fullmatch(r"(scripts|benchmarks)/\w+\.py", token)), None)
        if program is None:
            continue
        known = accepted_flags(program, capsys)
        after = tokens[tokens.index(program) + 1 :]
        unknown = [token.partition("=")[0] for token in after if token.startswith("--") and token.partition("=")[0] not in known]
        assert not unknown, f"{page}: {shlex.join(tokens)}: {program} does not accept {unknown}"
        checked += 1
    assert checked >= 20


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: broken link {target}"
