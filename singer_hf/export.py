"""Export a distilled student to ONNX, with a dynamic batch axis, and check it against PyTorch.

The graph's input is `pixel_values` (batch × channels × size × size, normalised by the student's
image processor, at the size the student was trained at); its outputs, by name (`OUTPUTS`):

- `features` (batch × tokens × width): what was distilled, the output of the student's deepest
  distilled block *before* the final norm (`hidden_states[j + 1]`, j = `student_layers[-1]` of
  `distillation/distillation_config.json`). The default, and the only output unless asked.
- `pooled_features` (batch × width): the CLS token of `features` (the mean of its patch tokens for
  a model without a CLS token, e.g. SigLIP). Not the model's `pooler_output`, which no loss trained.
- `last_hidden_state` (batch × tokens × width): the model's own `last_hidden_state`, after its final
  norm (CLIP normalises only its pooled token), which no distillation loss trained either.

The exporter is PyTorch's own, `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript's
ATen → ONNX functions and its graph optimiser). `optimum-onnx`, the other Hugging Face route, pins
`transformers<4.58` (optimum-onnx 0.1.0) and cannot be installed beside transformers 5. The dynamo
exporter emits LayerNorm as ONNX `LayerNormalization` with float32 accumulation (`stash_type=1`),
so a float16 graph does not square activations in float16, a cause of NaNs in decomposed float16
LayerNorms; activations that exceed float16's range (±65504) overflow in any float16 model, which is
why `compare_with_pytorch` runs the written graph and reports NaN/Inf by name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from .architectures import resolve_vit
from .layout import check_not_group, distilled_teachers

OUTPUTS = ("features", "pooled_features", "last_hidden_state")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
DEFAULT_OPSET = 18
"""The lowest opset onnxscript's ATen → ONNX functions are written for (a lower one would go through
the ONNX version converter): the graph older runtimes are most likely to read."""
MAX_OPSET = 23
"""torch 2.14's `torch.onnx` maximum (`ONNX_MAX_OPSET`); 18, 20 and 23 were checked with onnxruntime."""
DEFAULT_FILE_NAME = "model.onnx"
DISTILLATION_RECORD = Path("distillation") / "distillation_config.json"
"""Where scripts/distill.py records the teacher → student block mapping (`student_layers`)."""
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class ExportedStudent:
    path: Path
    outputs: tuple[str, ...]
    feature_block: int
    """The student block whose output (before the final norm) is `features`."""
    dtype: str
    opset: int
    input_shape: tuple[int, int, int]
    """(channels, height, width) of one image; the batch axis is dynamic."""
    seconds: float
    """Wall time of tracing, conversion and saving (the model already loaded)."""


class StudentOutputs(nn.Module):
    """The student's own forward pass, returning `outputs` (names of `OUTPUTS`) in that order.

    `features` is taken at the output of block `feature_block` by a hook during that one pass, so
    the graph holds each block once; blocks after it and the final norm are dropped from the graph
    when no output reads them.
    """

    def __init__(self, model: nn.Module, feature_block: int, outputs: tuple[str, ...]):
        super().__init__()
        vit = resolve_vit(model, "student_dir")
        vit.check_blocks([feature_block], "feature_block")
        self.backbone = vit.backbone
        self.feature_block = vit.blocks[feature_block]
        self.class_token = vit.has_class_token
        self.prefix_tokens = vit.num_prefix_tokens
        self.outputs = outputs
        self.input_shape = (vit.num_channels, vit.image_size, vit.image_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        captured = []
        hook = self.feature_block.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            model_output = self.backbone(pixel_values=pixel_values)
        finally:
            hook.remove()
        features = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
        values = {
            "features": features,
            "pooled_features": features[:, 0] if self.class_token else features[:, self.prefix_tokens :].mean(1),
            "last_hidden_state": model_output.last_hidden_state,
        }
        return tuple(values[name] for name in self.outputs)


def check_export_arguments(
    student_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    outputs: tuple[str, ...] | list[str] = ("features",),
    opset: int = DEFAULT_OPSET,
    dtype: str = "float32",
    feature_block: int | None = None,
    overwrite: bool = False,
) -> tuple[Path, int]:
    """(the .onnx path to write, the feature block), or a one-line ValueError naming the argument.

    Reads only config.json and the distillation record: no weights are loaded.
    """
    unknown = [name for name in outputs if name not in OUTPUTS]
    if not outputs or unknown or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs: give one or more distinct names of {', '.join(OUTPUTS)}; got {' '.join(outputs) or 'none'}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: one of {', '.join(DTYPES)}, got {dtype!r}")
    if not DEFAULT_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset: the dynamo exporter writes opsets {DEFAULT_OPSET}..{MAX_OPSET}, got {opset}")
    folder = Path(student_dir).expanduser()
    if not folder.is_dir():
        raise ValueError(f"student_dir: {student_dir} is not a folder; give the --output_dir of scripts/distill.py")
    check_not_group(folder, "student_dir")
    if not (folder / "config.json").is_file():
        raise ValueError(f"student_dir: {folder.name} holds no config.json; give the --output_dir of scripts/distill.py")
    if feature_block is None:
        feature_block = _deepest_distilled_block(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"student_dir: {folder.name}/config.json is not a transformers model config ({reason})") from None
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    resolve_vit(model, "student_dir").check_blocks([feature_block], "feature_block")
    return _writable_target(Path(output).expanduser(), overwrite), feature_block


def _deepest_distilled_block(folder: Path) -> int:
    record = folder / DISTILLATION_RECORD
    if not record.is_file():
        raise ValueError(
            f"student_dir: {folder.name} has no {DISTILLATION_RECORD.as_posix()}, so which block was distilled is unknown; "
            "give a folder written by scripts/distill.py, or --feature_block N (the model card's 'student block' of "
            "the final row)"
        )
    try:
        return max(int(part["student_layers"][-1]) for part in distilled_teachers(json.loads(record.read_text())).values())
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"student_dir: {DISTILLATION_RECORD.as_posix()} in {folder.name} has no list of student_layers") from None


def _writable_target(output: Path, overwrite: bool) -> Path:
    """`output` itself when it names a .onnx file, else `output`/model.onnx; its folder is created
    and written to once here, so that an unwritable place fails before the model is loaded."""
    path = output if output.suffix == ".onnx" else output / DEFAULT_FILE_NAME
    if path.is_dir():
        raise ValueError(f"output: {output} is a folder; name a .onnx file or a folder to write {DEFAULT_FILE_NAME} into")
    if path.exists() and not overwrite:
        raise ValueError(f"output: {path} exists; pass --overwrite true to replace it, or choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise ValueError(f"output: cannot write to {path.parent} ({error.strerror or error})") from None
    return path


def load_student(student_dir: str | os.PathLike, dtype: str = "float32") -> nn.Module:
    """The student as `transformers.AutoModel` loads it (safetensors only), in eval mode and `dtype`."""
    model = AutoModel.from_pretrained(Path(student_dir).expanduser(), use_safetensors=True).eval()
    if dtype == "float16":
        largest = max(parameter.detach().abs().max().item() for parameter in model.parameters())
        if largest > torch.finfo(torch.float16).max:
            raise ValueError(f"dtype: a weight of {largest:.3g} exceeds float16's range (±65504); export --dtype float32")
    return model.to(DTYPES[dtype])


def export_student(
    student_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    outputs: tuple[str, ...] | list[str] = ("features",),
    opset: int = DEFAULT_OPSET,
    dtype: str = "float32",
    feature_block: int | None = None,
    overwrite: bool = False,
) -> ExportedStudent:
    """Write the student of `student_dir` (a scripts/distill.py output folder) to ONNX.

    `output`: a `.onnx` file, or a folder that gets `model.onnx` and the student's
    `preprocessor_config.json` (a deployment folder `AutoImageProcessor` reads). The file is written
    under a temporary name and moved into place when complete, so a failed export leaves an earlier
    file intact.
    """
    outputs = tuple(outputs)
    if importlib.util.find_spec("onnxscript") is None:
        raise ModuleNotFoundError("the ONNX exporter needs onnx and onnxscript: pip install 'singer-hf[export]'")
    path, feature_block = check_export_arguments(
        student_dir, output, outputs=outputs, opset=opset, dtype=dtype, feature_block=feature_block, overwrite=overwrite
    )
    model = load_student(student_dir, dtype)
    module = StudentOutputs(model, feature_block, outputs).eval()
    example = torch.randn(2, *module.input_shape, dtype=DTYPES[dtype])
    start = time.perf_counter()
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        input_names=["pixel_values"],
        output_names=list(outputs),
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
        opset_version=opset,
        verbose=False,
    )
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent))
    try:
        program.save(staging / path.name)  # weights over 2 GB go to <name>.data beside it
        for staged in staging.iterdir():
            os.replace(staged, path.parent / staged.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    processor = Path(student_dir).expanduser() / PROCESSOR_FILE
    if Path(output).suffix != ".onnx" and processor.is_file():
        shutil.copyfile(processor, path.parent / PROCESSOR_FILE)
    return ExportedStudent(path, outputs, feature_block, dtype, opset, module.input_shape, seconds)


def compare_with_pytorch(
    exported: ExportedStudent, student_dir: str | os.PathLike, pixel_values: torch.Tensor | None = None
) -> dict[str, tuple[float, float]]:
    """Per output: (max |ONNX Runtime − PyTorch float32|, max |PyTorch float32|) on `pixel_values`
    (float32, normalised; default: two seeded standard-normal images), the ONNX graph run by
    onnxruntime's CPU provider in its own dtype.

    Raises a one-line ValueError naming `dtype` when the graph returns NaN or Inf where PyTorch
    float32 does not.
    """
    try:
        import onnxruntime
    except ImportError:
        raise ModuleNotFoundError("the check runs the graph with onnxruntime: pip install 'singer-hf[export]'") from None

    if pixel_values is None:
        pixel_values = torch.randn(2, *exported.input_shape, generator=torch.Generator().manual_seed(0))
    reference_model = load_student(student_dir)
    module = StudentOutputs(reference_model, exported.feature_block, exported.outputs).eval()
    with torch.no_grad():
        references = module(pixel_values.float())
    session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    results = session.run(None, {"pixel_values": pixel_values.to(DTYPES[exported.dtype]).numpy()})
    figures = {}
    for name, reference, result in zip(exported.outputs, references, results):
        result = torch.from_numpy(result).float()
        if not torch.isfinite(result).all() and torch.isfinite(reference).all():
            raise ValueError(
                f"dtype: the {exported.dtype} graph {exported.path.name} returns NaN/Inf in {name!r} where PyTorch float32 "
                "does not (activations beyond float16's range?); export --dtype float32"
            )
        figures[name] = ((result - reference).abs().max().item(), reference.abs().max().item())
    return figures
