"""SiNGER ViT feature distillation, Hugging Face native.

The names below are imported on first use, so that the command-line programs answer `--help` and a
mistyped flag without importing torch, PEFT or datasets (seconds). Importing the package still
registers the SINGER PEFT type for `peft.PeftModel.from_pretrained`: at once when PEFT is already
imported, else as soon as it is.
"""

import importlib
import importlib.abc
import importlib.util
import sys

_EXPORTS = {
    "ARCHITECTURES": "architectures",
    "resolve_vit": "architectures",
    "DistillationModel": "modeling",
    "DistillationModelConfig": "modeling",
    "DistillationOutput": "modeling",
    "TeacherSettings": "modeling",
    "map_layers": "modeling",
    "TeacherHeads": "heads",
    "load_teacher_heads": "heads",
    "FeatureDistillationArguments": "trainer",
    "FeatureDistillationTrainer": "trainer",
    "SingerConfig": "tuner",
    "SingerLayer": "tuner",
    "SingerModel": "tuner",
    "nullspace_basis": "tuner",
    "nullspace_directions": "tuner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _RegisterWithPeft(importlib.abc.MetaPathFinder):
    """Imports `singer_hf.tuner` (which registers the SINGER PEFT type) right after PEFT itself is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        # Availability checks (importlib.util.find_spec) come here too: only an executed import counts.
        spec = next((s for f in sys.meta_path if f is not self for s in [f.find_spec(fullname, path, target)] if s), None)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                importlib.import_module(".tuner", __name__)

            spec.loader.exec_module = exec_module
        return spec


if "peft" in sys.modules:
    importlib.import_module(".tuner", __name__)
elif not any(isinstance(finder, _RegisterWithPeft) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithPeft())
