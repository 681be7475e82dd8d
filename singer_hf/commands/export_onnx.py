"""Export a distilled student to ONNX (dynamic batch axis) and check it against PyTorch.

    python scripts/export_onnx.py --student_dir outputs/my-student --output outputs/my-student-onnx
    python scripts/export_onnx.py --student_dir outputs/my-student --output student_fp16.onnx --dtype float16 \\
        --outputs features pooled_features last_hidden_state

The graph takes `pixel_values` (the student's image processor's output) and returns the distilled
`features` (the deepest distilled block's output, before the final norm), and on request
`pooled_features` and `last_hidden_state` (see singer_hf/export.py). After writing it, the command
runs it with onnxruntime on random images and prints its largest difference from PyTorch float32;
NaN or Inf in the ONNX outputs is an error. Needs `pip install 'singer-hf[export]'`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from singer_hf.cli import StrictArgumentParser, run_cli
from singer_hf.export import DEFAULT_OPSET, DTYPES, OUTPUTS, compare_with_pytorch, export_student


@dataclass
class ExportArguments:
    student_dir: str = field(metadata={"help": "The --output_dir of scripts/distill.py (a student folder)."})
    output: str = field(metadata={"help": "A .onnx file, or a folder to write model.onnx and preprocessor_config.json into."})
    outputs: list[str] = field(
        default_factory=lambda: ["features"], metadata={"help": f"Graph outputs, in order, of: {', '.join(OUTPUTS)}."}
    )
    dtype: Literal[tuple(DTYPES)] = field(default="float32", metadata={"help": "Weights, input and outputs in this dtype."})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset, 18 to 23."})
    feature_block: int | None = field(
        default=None,
        metadata={"help": "Student block whose output is `features`; default: the deepest distilled block (distillation/)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing .onnx file."})
    check: bool = field(default=True, metadata={"help": "Run the graph with onnxruntime and compare it with PyTorch."})


def main(argv: list[str] | None = None):
    (args,) = StrictArgumentParser(ExportArguments).parse(sys.argv[1:] if argv is None else argv)
    exported = export_student(
        args.student_dir, args.output, outputs=args.outputs, opset=args.opset, dtype=args.dtype,
        feature_block=args.feature_block, overwrite=args.overwrite,
    )  # fmt: skip
    print(
        f"Wrote {exported.path} in {exported.seconds:.1f} s: opset {exported.opset}, {exported.dtype}, input pixel_values "
        f"[batch, {', '.join(map(str, exported.input_shape))}], outputs {', '.join(exported.outputs)} "
        f"(features: block {exported.feature_block}'s output, before the final norm)"
    )
    if args.check:
        print("onnxruntime (CPU) vs PyTorch float32 on 2 random images:")
        for name, (difference, largest) in compare_with_pytorch(exported, args.student_dir).items():
            print(f"  {name}: max |onnxruntime - PyTorch float32| = {difference:.2e} ({difference / largest:.1e} of max |value|)")
    return exported


def cli() -> None:
    """`singer-export` and `python scripts/export_onnx.py`: `main` with its errors as one line (exit status 2)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
