"""High-norm artifact diagnostics of a ViT, optionally raw vs SiNGER-refined teacher vs student.

    # any backbone: statistics over 64 test images, figures of 4
    python scripts/diagnose.py --model_name_or_path google/vit-base-patch16-224 \
        --dataset_name ILSVRC/imagenet-1k --split validation --output_dir outputs/diagnose-vit-b
    # a SiNGER run: the teacher with the run's adapters (distillation/) applied, and its student
    python scripts/diagnose.py --model_name_or_path outputs/demo/teacher --run_dir outputs/demo/student \
        --dataset_name outputs/demo/fashion_mnist --split test --output_dir outputs/demo/diagnose

Writes `artifact_stats.json` (per view and block: max/median patch-norm ratio, share of outlier
patch tokens, norm quantiles, CLS norm), `patch_norms.png` (the views of an image share one colour
scale), `norm_histograms.png` (log counts, x axes clipped to the data) and `comparison.png` (one
image: norm map, cosine map from a patch, cosine Gram matrix per view, one colour scale per column).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
from transformers import AutoImageProcessor

import singer_hf  # noqa: F401  (registers the SINGER PEFT type for PeftModel.from_pretrained)
from singer_hf.architectures import load_backbone
from singer_hf.cli import StrictArgumentParser, run_cli
from singer_hf import resolve_vit
from singer_hf.data import ImageTransform, build_transforms, image_processor_stats, load_image_dataset
from singer_hf.diagnostics import (
    DEFAULT_OUTLIER_RATIO,
    artifact_stats,
    comparison_figure,
    norm_histograms_figure,
    norm_maps_figure,
    patch_norms,
)
from singer_hf.locations import public_name
from singer_hf.layout import CONFIG_FILE, DISTILLATION_DIR, distilled_teachers


@dataclass
class DiagnoseArguments:
    model_name_or_path: str = field(metadata={"help": "Backbone to diagnose (the teacher, for a SiNGER run)."})
    dataset_name: str = field(metadata={"help": "HF dataset: Hub id, local folder, or a local Parquet/Arrow/JSONL file."})
    output_dir: str = field(metadata={"help": "Where the JSON statistics and PNG figures are written."})
    run_dir: str | None = field(
        default=None, metadata={"help": "A SiNGER run (student folder with distillation/): adds refined teacher and student views."}
    )
    teacher: str | None = field(
        default=None, metadata={"help": "With a run_dir student of several teachers: which of them model_name_or_path is (its name in the run)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Split the images are drawn from."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    num_images: int = field(default=64, metadata={"help": "Images the statistics are computed over (the first N)."})
    figure_images: int = field(default=4, metadata={"help": "Images shown in patch_norms.png."})
    layers: list[int] = field(
        default_factory=list, metadata={"help": "Teacher blocks to inspect (default: the run's distilled blocks, else the last)."}
    )
    outlier_ratio: float = field(default=DEFAULT_OUTLIER_RATIO, metadata={"help": "Outlier: norm above this × its image's median."})
    query_patch: int = field(default=-1, metadata={"help": "Patch index for the cosine map (-1: the centre patch)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub code for the models (off by default)."})


def check_arguments(args: DiagnoseArguments) -> tuple[dict | None, Path | None]:
    """Cheap checks before any model is loaded; returns the run's distillation settings for the teacher
    diagnosed (its blocks, student blocks) and the folder holding its adapters."""
    if args.num_images < 1 or not 1 <= args.figure_images <= args.num_images:
        raise ValueError(f"num_images={args.num_images} / figure_images={args.figure_images}: need 1 <= figure_images <= num_images")
    if args.outlier_ratio <= 1:
        raise ValueError(f"outlier_ratio={args.outlier_ratio} must be above 1")
    if args.run_dir is None:
        if args.teacher is not None:
            raise ValueError("teacher: names a teacher of a run; give the run with --run_dir")
        return None, None
    folder = Path(args.run_dir) / DISTILLATION_DIR
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"run_dir={args.run_dir!r} holds no {DISTILLATION_DIR}/{CONFIG_FILE}; give a scripts/distill.py output folder")
    teachers = distilled_teachers(json.loads((folder / CONFIG_FILE).read_text()))
    if list(teachers) == [None]:
        if args.teacher is not None:
            raise ValueError(f"teacher: the run learnt from one teacher; leave --teacher unset (got {args.teacher!r})")
        return teachers[None], folder
    if args.teacher not in teachers:
        raise ValueError(f"teacher: the run learnt from several teachers; give the one model_name_or_path is, one of {sorted(teachers)}")
    return teachers[args.teacher], folder / args.teacher


@torch.no_grad()
def block_outputs(model, pixel_values: torch.Tensor, batch_size: int = 64) -> list[torch.Tensor]:
    """Every block's output (before the final norm) for all images: one L-long list of B×N×D."""
    vit = resolve_vit(model)
    vit.backbone.eval()
    chunks = [vit.block_outputs(chunk) for chunk in pixel_values.split(batch_size)]
    return [torch.cat([chunk[layer] for chunk in chunks]).float() for layer in range(vit.depth)]


def main(argv: list[str] | None = None) -> dict:
    (args,) = StrictArgumentParser(DiagnoseArguments).parse(sys.argv[1:] if argv is None else argv)
    distillation, adapter_dir = check_arguments(args)
    dataset = load_image_dataset(args.dataset_name, args.dataset_config, args.split, args.image_column, streaming=False)
    dataset = dataset.select(range(min(args.num_images, len(dataset))))

    teacher = load_backbone(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    teacher_vit = resolve_vit(teacher, "model_name_or_path")
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    mean, std, _ = image_processor_stats(processor, teacher_vit.input_normalization)
    pixel_values = _pixel_values(dataset, args.image_column, mean, std, teacher_vit.image_size)
    shown = (pixel_values[: args.figure_images] * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None])
    shown = shown.clamp(0, 1).permute(0, 2, 3, 1)

    layers = args.layers or (distillation["teacher_layers"] if distillation else [teacher_vit.depth - 1])
    for layer in layers:
        if not 0 <= layer < teacher_vit.depth:
            raise ValueError(f"layers: block {layer} is out of range for a {teacher_vit.depth}-block model")
    teacher_outputs = block_outputs(teacher, pixel_values)
    adapters, pairs = {}, {}
    if distillation:
        if (adapter_dir / "adapter_config.json").is_file():
            adapters = peft.PeftModel.from_pretrained(teacher, str(adapter_dir)).base_model.singer_layers
        student = load_backbone(args.run_dir)
        student_vit = resolve_vit(student, "run_dir")
        # The student reads the images as its own processor gives them (with several teachers, not this teacher's);
        # one saved without a processor read the teacher's.
        student_pixels = pixel_values
        if (Path(args.run_dir) / "preprocessor_config.json").is_file():
            student_mean, student_std, _ = image_processor_stats(AutoImageProcessor.from_pretrained(args.run_dir))
            student_pixels = _pixel_values(dataset, args.image_column, student_mean, student_std, student_vit.image_size)
        student_outputs = block_outputs(student, student_pixels)
        pairs = dict(zip(distillation["teacher_layers"], distillation["student_layers"]))
    views: dict[str, torch.Tensor] = {}  # "<view> block <i>" → B×N×D, grouped by teacher block
    prefix: dict[str, int] = {}
    with torch.no_grad():
        for layer in layers:
            views[f"teacher block {layer}"], prefix[f"teacher block {layer}"] = teacher_outputs[layer], teacher_vit.num_prefix_tokens
            if layer in adapters:
                name = f"refined teacher block {layer}"
                views[name], prefix[name] = adapters[layer].refine(teacher_outputs[layer]), teacher_vit.num_prefix_tokens
            if layer in pairs:
                name = f"student block {pairs[layer]}"
                views[name], prefix[name] = student_outputs[pairs[layer]], student_vit.num_prefix_tokens

    stats = {name: artifact_stats(features, prefix[name], args.outlier_ratio) for name, features in views.items()}
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    report = {
        "model": public_name(args.model_name_or_path),
        "run": public_name(args.run_dir) if args.run_dir else None,
        "dataset": {"split": args.split, "num_images": len(dataset)},
        "feature": "block output before the final norm; refined = the run's SiNGER adapter applied to it",
        "views": stats,
    }
    (output / "artifact_stats.json").write_text(json.dumps(report, indent=2) + "\n")

    norms = {name: patch_norms(features, prefix[name]) for name, features in views.items()}
    norm_maps_figure(shown, {name: values[: args.figure_images] for name, values in norms.items()}, output / "patch_norms.png")
    norm_histograms_figure(norms, output / "norm_histograms.png", args.outlier_ratio)
    last = layers[-1]
    names = [f"teacher block {last}", f"refined teacher block {last}"]
    if last in pairs:
        names.append(f"student block {pairs[last]}")
    panel = {name: views[name][0, prefix[name] :] for name in names if name in views}
    patches = next(iter(panel.values())).shape[0]
    side = int(patches**0.5)
    query = args.query_patch if args.query_patch >= 0 else (side // 2) * side + side // 2
    if not 0 <= query < patches:
        raise ValueError(f"query_patch={args.query_patch} is out of range for {patches} patches")
    comparison_figure(shown[0], panel, query, output / "comparison.png")
    for name, values in stats.items():
        ratio = values["max_median_ratio"]
        print(f"{name}: max/median norm {ratio['mean']:.2f} (max {ratio['max']:.2f}), "
              f"outliers (> {args.outlier_ratio:g}× median) {100 * values['outlier_share']:.2f} % of patch tokens")  # fmt: skip
    return report


def _pixel_values(dataset, image_column: str, mean, std, image_size: int) -> torch.Tensor:
    """The dataset's images resized, centre-cropped and normalised as an image processor gives them."""
    transform = ImageTransform(build_transforms(mean, std, image_size, train=False), image_column)
    return torch.stack(transform({image_column: dataset[image_column]})["pixel_values"])


def cli() -> None:
    """`singer-diagnose` and `python scripts/diagnose.py`: `main` with its errors as one line (exit status 2)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
