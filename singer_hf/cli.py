"""Command-line plumbing shared by the scripts: a strict argument parser and one-line errors.

- `StrictArgumentParser`: an `HfArgumentParser` that refuses abbreviated flags, reports argparse
  errors as one line, and takes a YAML/JSON recipe anywhere on the command line as its defaults (flags
  always win over the recipe, wherever they are); an unknown flag or recipe key is refused by name,
  with the closest known one.
- `source_fields` / `StrictArgumentParser.add_source_fields`: the flags of a dataclass read from its
  module's source without importing it, so that a script answers `--help` and a mistyped flag
  before importing `transformers.TrainingArguments` (which imports torch, Accelerate and PEFT).
- `run_cli(main)`: runs a script's `main`; an error becomes one line on stderr and exit status 2
  (1 for a fault during the run), the traceback only with a bare `--debug` or `SINGER_DEBUG=1`.
- `check_local_path`: a path-looking name that does not exist fails at once, before any Hub lookup;
  `check_hub_reachable`: Hub ids fail at once, in one line, when the Hub does not answer.
- `rerun_command`: the command line that runs a script again, e.g. to resume or to publish a run.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import get_session
from transformers import HfArgumentParser

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
DEBUG_FLAG = "--debug"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class UsageError(ValueError):
    """Bad input: reported in one line with exit status 2, like argparse's own errors."""


class StrictArgumentParser(HfArgumentParser):
    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise UsageError(message)

    def parse(self, argv: list[str]) -> tuple:
        """The dataclasses from `argv`. One positional YAML/JSON recipe, anywhere in it, sets the parser's
        defaults (as TRL's `--config` does), so flags win wherever they are and the recipe's values arrive
        as written: `null` and mappings included, the others typed and checked as their flags would be."""
        self._check_flags(argv)
        recipes = [index for index, token in enumerate(argv) if _is_recipe(argv, index)]
        if len(recipes) > 1:
            raise UsageError(f"config file: give at most one YAML/JSON recipe, got {[argv[i] for i in recipes]}")
        if recipes:
            index = recipes[0]
            self._set_recipe_defaults(argv[index])
            argv = argv[:index] + argv[index + 1 :]
        return self.parse_args_into_dataclasses(args=argv, look_for_args_file=False)

    def add_source_fields(self, title: str, fields: list[SourceField]) -> None:
        """Accepts and documents `fields` (see `source_fields`) as flags taking any values, in a group after the
        dataclasses' own; fields of the same name already added are skipped. Their values are parsed and
        checked by the real dataclass later."""
        known = {action.dest for action in self._actions}
        group = self.add_argument_group(title)
        for spec in fields:
            if spec.name in known:
                continue
            text = f"{spec.help} (default: {spec.default})".replace("%", "%%")
            group.add_argument(*_long_options(spec.name), nargs="*", default=argparse.SUPPRESS, metavar="VALUE", help=text)
            if spec.negatable:
                group.add_argument(f"--no_{spec.name}", f"--no-{spec.name.replace('_', '-')}", action="store_true",
                                   default=argparse.SUPPRESS, help=f"Sets --{spec.name} false.")  # fmt: skip

    def _check_flags(self, argv: list[str]) -> None:
        """An unknown `--flag` fails first, naming the closest known one (before "required" errors, which a typo causes)."""
        known = {option for action in self._actions for option in action.option_strings}
        for token in argv:
            if token == "--":
                break
            flag = token.partition("=")[0]
            if token.startswith("--") and flag not in known:
                spelled = "--" + flag[2:].replace("-", "_")
                names = [option for option in known if option.startswith("--") and "-" not in option[2:]]
                close = difflib.get_close_matches(spelled, names, n=1)
                hint = f"; did you mean {close[0]}?" if close else " (see --help)"
                raise UsageError(f"{flag}: unknown argument{hint}")

    def _set_recipe_defaults(self, path: str) -> None:
        if not Path(path).is_file():
            raise UsageError(f"config file: {path} does not exist")
        values = read_mapping_file(path, "config file")
        if not isinstance(values, dict):
            raise UsageError(f"config file: {path} must hold a mapping of argument names to values")
        self.set_mapping_defaults(values, f"config file {path}")

    def set_mapping_defaults(self, values: dict, where: str) -> None:
        """Sets `values` (argument name → value, as a recipe holds them) as the parser's defaults, each typed
        and checked as its flag would be; an unknown name fails naming `where` and the closest known name."""
        actions = {}  # dest -> its flags' actions (`--name` first, then HfArgumentParser's `--no_name`)
        for action in self._actions:
            if action.option_strings and action.dest != "help":
                actions.setdefault(action.dest, []).append(action)
        for key in values:
            if key not in actions:
                close = difflib.get_close_matches(str(key), actions, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise UsageError(f"{key}: unknown key in {where}{hint}")
        self.set_defaults(**{key: self._mapping_value(actions[key][0], key, value, where) for key, value in values.items()})
        for key in values:
            for action in actions[key]:
                action.required = False  # the mapping gives it

    def _mapping_value(self, action: argparse.Action, key: str, value, where: str):
        """`value` as its flag would parse it (type, choices, one value or a list); `null`, mappings and lists
        of mappings (a recipe's `students:`) as written."""
        if value is None or isinstance(value, dict) or (isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value)):
            return value
        strings = [str(item) for item in value] if isinstance(value, list) else [str(value)]
        if action.nargs in (None, "?") and len(strings) != 1:
            raise UsageError(f"{key}: expected one value in {where}, got {value!r}")
        try:
            return self._get_values(action, strings)
        except argparse.ArgumentError as error:
            raise UsageError(f"{key}: {error.message} ({where})") from None

    def parse_mapping(self, values: dict, where: str) -> tuple:
        """The dataclasses from a mapping of argument names to values (e.g. one entry of a list in a
        recipe), in a parser of their own so no entry's values become another's defaults; errors name `where`."""
        parser = type(self)(self.dataclass_types)
        parser.set_mapping_defaults(values, where)
        try:
            return parser.parse_args_into_dataclasses(args=[], look_for_args_file=False)
        except UsageError as error:
            raise UsageError(f"{where}: {error}") from None


def read_mapping_file(path: str, argument: str):
    """The content of a YAML or JSON file (JSON by its suffix); a syntax error is one line naming `argument`."""
    text = Path(path).read_text()
    try:
        return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise UsageError(f"{argument}: {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'} ({str(error).splitlines()[0]})") from None


@dataclass(frozen=True)
class SourceField:
    """A dataclass field as written in its module's source: enough to document and recognise its flags."""

    name: str
    help: str
    default: str
    negatable: bool
    """A bool defaulting to True, which `HfArgumentParser` also gives a `--no_NAME` flag."""


def source_fields(module: str, class_name: str) -> list[SourceField] | None:
    """The init fields of the dataclass `class_name`, read from `module`'s source without executing it (its
    parent packages are imported); None when they cannot be read that way (e.g. the class has base classes)."""
    spec = importlib.util.find_spec(module)
    try:
        tree = ast.parse(Path(spec.origin).read_text())
    except (AttributeError, TypeError, OSError, SyntaxError):
        return None
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name]
    if len(classes) != 1 or classes[0].bases:
        return None
    fields = []
    for node in classes[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        value = node.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
            keywords = {keyword.arg: keyword.value for keyword in value.keywords}
        else:
            keywords = {} if value is None else {"default": value}
        if isinstance(keywords.get("init"), ast.Constant) and keywords["init"].value is False:
            continue
        metadata = keywords.get("metadata")
        help_text = ""
        if isinstance(metadata, ast.Dict):
            for key, value in zip(metadata.keys, metadata.values):
                if isinstance(key, ast.Constant) and key.value == "help" and isinstance(value, ast.Constant):
                    help_text = str(value.value)
        default = keywords.get("default", keywords.get("default_factory"))
        annotation = ast.unparse(node.annotation).replace(" ", "")
        negatable = annotation in ("bool", "bool|None", "Optional[bool]") and isinstance(default, ast.Constant) and default.value is True
        text = "required" if default is None else ast.unparse(default)
        fields.append(SourceField(node.target.id, " ".join(help_text.split()), text, negatable))
    return fields


def _long_options(name: str) -> list[str]:
    """`--name` and, as `HfArgumentParser` adds, `--name-with-dashes`."""
    return [f"--{name}", f"--{name.replace('_', '-')}"] if "_" in name else [f"--{name}"]


def _is_recipe(argv: list[str], index: int) -> bool:
    """A recipe is a positional `*.yaml|yml|json` token, i.e. not the value of the flag before it."""
    token = argv[index]
    return token.endswith(RECIPE_SUFFIXES) and not token.startswith("-") and (index == 0 or not argv[index - 1].startswith("-"))


def looks_local(name: str) -> bool:
    """A name meant as a local path: absolute, ./ ../ ~, more than one "/", or its first folder exists here."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or not _HUB_ID.match(name):
        return True
    first, _, rest = name.partition("/")
    return bool(rest) and Path(first).is_dir()


def check_local_path(argument: str, name: str | None) -> None:
    """Fails at once for a local-looking `name` that does not exist, instead of a slow Hub lookup."""
    if name is not None and looks_local(name) and not Path(name).expanduser().exists():
        raise UsageError(f"{argument}: {name} looks like a local path, but it does not exist (a Hub id is 'owner/name')")


def check_hub_reachable(names: dict[str, str | None], timeout: float = 5.0) -> None:
    """Fails in one line when some of `names` (argument → name) are Hub ids and the Hub does not answer one
    request (no retries) within `timeout` seconds: the libraries would otherwise retry each file for half a
    minute, with a warning per retry. Names that exist locally are not Hub ids; with HF_HUB_OFFLINE=1 the
    local cache answers and nothing is checked."""
    hub_ids = {argument: name for argument, name in names.items() if name and not Path(name).expanduser().exists()}
    if not hub_ids or hub_constants.HF_HUB_OFFLINE:
        return
    endpoint = hub_constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - whatever the HTTP client raises, the Hub did not answer
        (argument, name), *others = hub_ids.items()
        also = f" (also Hub ids: {', '.join(f'{other}={value}' for other, value in others)})" if others else ""
        raise UsageError(
            f"{argument}: {name} is a Hub id, but the Hub at {endpoint} does not answer ({type(error).__name__}); if it "
            f"is in your cache, set HF_HUB_OFFLINE=1, else give a local folder{also}"
        ) from None


def rerun_command(script: str | os.PathLike, argv: list[str]) -> str:
    """The shell command that runs `script` with `argv`, with this process's interpreter and its options when
    this process was itself started as a script (else `python`); the script's path relative to here if below."""
    interpreter, started = ["python"], len(sys.orig_argv) - len(sys.argv)
    if sys.argv and started > 0 and Path(sys.argv[0]).is_file() and Path(sys.orig_argv[started]).resolve() == Path(sys.argv[0]).resolve():
        interpreter = sys.orig_argv[:started]
    path = Path(script).resolve()
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    return shlex.join([*interpreter, str(shown), *argv])


def _pop_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Removes a bare `--debug`; `--debug underflow_overflow` (TrainingArguments' own option) stays."""
    for index, token in enumerate(argv):
        if token == DEBUG_FLAG and (index + 1 == len(argv) or argv[index + 1].startswith("-")):
            return argv[:index] + argv[index + 1 :], True
    return argv, False


def _lost_peer_rank(error: Exception) -> int | None:
    """This process's rank when `error` is a collective that failed because a peer went away, else None."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group (and no seconds spent importing it)
    if dist is None or not (dist.is_available() and dist.is_initialized()) or not isinstance(error, RuntimeError):
        return None
    text = str(error).lower()
    return dist.get_rank() if any(word in text for word in ("gloo", "nccl", "connection reset", "connection closed")) else None


def run_cli(main, argv: list[str] | None = None):
    """Runs `main(argv)`; errors are one line on stderr (no traceback unless --debug/SINGER_DEBUG=1)."""
    argv, debug = _pop_debug_flag(sys.argv[1:] if argv is None else argv)
    if debug or os.environ.get("SINGER_DEBUG") == "1":
        return main(argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
        text = str(error)
        if "Traceback (most recent call last)" in text:  # raised in a DataLoader worker: the error is the last line
            text = text.strip().splitlines()[-1].partition(": ")[2] or text
        message = " ".join(text.split()) or type(error).__name__
        if not isinstance(error, (UsageError, ValueError, FileNotFoundError)):
            message = f"{type(error).__name__}: {message}"
        rank = _lost_peer_rank(error)
        if rank is not None:
            message = f"rank {rank}: another process of this run stopped or hung (its own log says why): {message}"
        print(f"error: {message} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(2 if isinstance(error, (UsageError, ValueError)) else 1)
