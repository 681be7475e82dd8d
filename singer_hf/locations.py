"""One rule for "is this a local path or a Hub id?", and the public name of either.

Models and datasets are named the same way on the command line, in recipes and in records: a Hub
repo id (`owner/name`) or a local path. A name is local when it exists here, or is written as a
path (absolute, `./`, `../`, `~`, a data or weights file suffix), or cannot be a Hub id; everything
else is a Hub id. What is written into files others see (model cards, adapter configs, results)
names a local path by its last component only: never an absolute path or a home directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

PATH_PREFIXES = ("/", "./", "../", "~", ".\\")
FILE_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tar", ".yaml", ".yml", ".safetensors", ".bin", ".pt")


def is_local(name: str) -> bool:
    """Whether `name` means a local path (see the module docstring)."""
    if name.startswith(PATH_PREFIXES) or Path(name).suffix.lower() in FILE_SUFFIXES or Path(name).expanduser().exists():
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub id, else None."""
    return None if not name or is_local(name) else name


def public_name(name: str | None) -> str | None:
    """A Hub id as it is; a local path as its last component (resolved, so `.` has a name)."""
    if not name or not is_local(name):
        return name
    return Path(name).expanduser().resolve().name or "model"


def looks_like_local_path(value: str) -> bool:
    """A string inside a record that names a local path: absolute, or in the home directory."""
    home = os.path.expanduser("~")
    return os.path.isabs(value) or value.startswith("~") or (home not in ("", "/") and home in value)


def without_local_paths(value):
    """`value` (JSON-like) with every absolute or home-relative path reduced to its last component."""
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and looks_like_local_path(value):
        return Path(os.path.expanduser(value)).name or "model"
    return value
