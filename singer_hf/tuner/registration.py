"""Registers SiNGER as a PEFT method.

PEFT 0.21's `register_peft_method` accepts only names that are members of its `PeftType` enum, and
the enum has no extension point. This module adds the member once, at import; it is the only place
that touches PEFT internals, and `pyproject.toml` pins the PEFT releases it was checked against.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

from .config import SingerConfig
from .model import SingerModel

PEFT_TYPE_NAME = "SINGER"


def _add_peft_type(name: str) -> None:
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)


def register() -> None:
    """Make `SingerConfig` usable with `get_peft_model`, `save_pretrained` and `PeftModel.from_pretrained`."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    _add_peft_type(PEFT_TYPE_NAME)
    if PeftType.SINGER not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=SingerConfig, model_cls=SingerModel, prefix="singer_")
