"""Linear probes on a frozen ViT (docs/method.md §8): classification, semantic segmentation, depth.

    # ImageNet-1k, the paper's head (lr 0.5, 150 epochs), re-used on ImageNet-v2 and ImageNet-R
    python scripts/evaluate.py --model_name_or_path outputs/my-student --dataset_name ILSVRC/imagenet-1k \
        --extra_test_datasets vaishaal/ImageNetV2:test --imagenet_r_dataset axiong/imagenet-r:test \
        --output_dir outputs/my-student/probe-in1k --feature_cache_dir outputs/feature-cache
    # ADE20K and NYUd-v2
    python scripts/evaluate.py --task image-segmentation --dataset_name scene_parse_150 \
        --label_column annotation --reduce_labels true --output_dir ...
    python scripts/evaluate.py --task depth-estimation --dataset_name sayakpaul/nyu_depth_v2 \
        --label_column depth_map --test_split validation --output_dir ...
    # several learning rates at once, selected on a held-out 10 % of the training split
    python scripts/evaluate.py ... --learning_rates 0.05 0.1 0.5 1.0
    # extraction split across processes
    accelerate launch scripts/evaluate.py ...
    # the official probes' training augmentation (slower: a backbone pass per training epoch)
    python scripts/evaluate.py ... --augmentation paper

Features (the chosen block's output before the final norm, read through singer_hf's architecture
table) are extracted once per split and kept in memory, or with --feature_cache_dir in
safetensors shards that later runs reuse. With --augmentation paper the training split is run
through the backbone again every epoch on freshly augmented images (not cached). The output
directory gets results.json (schema "singer-hf/probe-results", documented in docs/evaluation.md) and
results.md.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from transformers import AutoImageProcessor, set_seed

from singer_hf.architectures import load_backbone
from singer_hf.cli import StrictArgumentParser, run_cli
from singer_hf import resolve_vit
from singer_hf.data import image_processor_stats, load_image_dataset
from singer_hf.layout import check_not_group
from singer_hf.evaluation import (
    AugmentedFeatures,
    ClassificationProbe,
    DepthProbe,
    SegmentationProbe,
    cached_features,
    evaluate_heads,
    extract_features,
    fit_probe,
    imagenet_r_logit_indices,
)
from singer_hf.evaluation.features import summary_name, weights_digest
from singer_hf.evaluation.metrics import IGNORE_INDEX
from singer_hf.evaluation.probe_data import (
    AUGMENTATIONS,
    DENSE_TASKS,
    ProbeTransform,
    check_probe_example,
    collate_probe_batch,
    paper_augmentation,
)
from singer_hf.evaluation.probes import MOMENTUM, WEIGHT_DECAY
from singer_hf.evaluation.results import SCHEMA, SCHEMA_VERSION, markdown_table, metric_entries
from singer_hf.hardware import has_accelerator
from singer_hf.locations import public_name

TASKS = ("image-classification", *DENSE_TASKS)
PAPER_EPOCHS = {"image-classification": 150, "image-segmentation": 200, "depth-estimation": 200}
DTYPES = {"auto": None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BackboneArguments:
    model_name_or_path: str = field(metadata={"help": "Frozen backbone: Hub id or local folder (any ViT of the table)."})
    layer: int = field(default=-1, metadata={"help": "Block whose output is probed (-1: the last, the paper's)."})
    dtype: str = field(
        default="auto", metadata={"help": f"Extraction autocast, one of {sorted(DTYPES)}; auto: bfloat16 on GPU, float32 on CPU."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub code for the model (off by default)."})


@dataclass
class ProbeDataArguments:
    dataset_name: str = field(metadata={"help": "HF dataset: Hub id, local folder, or a local Parquet/Arrow/JSONL file."})
    task: str = field(default="image-classification", metadata={"help": f"One of {list(TASKS)}."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Dataset revision (Hub datasets), recorded in results.json."})
    train_split: str = field(default="train", metadata={"help": "Split the heads are trained on."})
    test_split: str = field(default="validation", metadata={"help": "Split the metrics are reported on."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Class label, segmentation mask or depth map column."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training examples only."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Use the first N test examples only."})
    extra_test_datasets: list[str] = field(
        default_factory=list,
        metadata={"help": "Classification: more NAME[:SPLIT] test sets with the same labels, scored by the same head (ImageNet-v2)."},
    )
    imagenet_r_dataset: str | None = field(
        default=None,
        metadata={"help": "Classification: ImageNet-R as NAME[:SPLIT], its 200 labels in WordNet-id order, scored by the 1000-class head."},
    )
    num_labels: int | None = field(default=None, metadata={"help": "Segmentation classes (default: the largest training label + 1)."})
    reduce_labels: bool = field(
        default=False, metadata={"help": "Segmentation: label 0 ('other') is ignored, 1..K become 0..K-1 (ADE20K scene_parse_150)."}
    )
    depth_scale: float = field(default=1.0, metadata={"help": "Depth: stored value / depth_scale = metres (1000 for millimetres)."})
    max_depth: float = field(default=10.0, metadata={"help": "Depth: bins span [0, max_depth] m; valid pixels are 0 < d < max_depth."})


@dataclass
class ProbeArguments:
    output_dir: str = field(metadata={"help": "Where results.json and results.md are written."})
    learning_rates: list[float] = field(
        default_factory=lambda: [0.5], metadata={"help": "One (the paper's 0.5) or several, trained at once as parallel heads."}
    )
    epochs: int | None = field(default=None, metadata={"help": f"Default: the paper's, {PAPER_EPOCHS}."})
    batch_size: int = field(default=64, metadata={"help": "Probe batch size (the paper's ImageNet README: 64)."})
    held_out_fraction: float = field(
        default=0.1, metadata={"help": "With several learning rates: share of the training split held out to select one."}
    )
    augmentation: str = field(
        default="none",
        metadata={"help": f"Training-image augmentation, one of {list(AUGMENTATIONS)}. none: features extracted once (fast; "
                  "training images get the test preprocessing). paper: the official probes' random crops/flips (and colour "
                  "jitter for the dense tasks), the backbone re-run on freshly augmented images every epoch."},
    )  # fmt: skip
    seed: int = field(default=0, metadata={"help": "Seeds head initialisation, batch order, the held-out split and augmentation."})
    feature_cache_dir: str | None = field(default=None, metadata={"help": "Keep extracted features here (safetensors shards) for later runs."})
    extraction_batch_size: int = field(default=128, metadata={"help": "Images per backbone forward pass."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers decoding images for extraction."})


def parse_arguments(argv: list[str]) -> tuple[BackboneArguments, ProbeDataArguments, ProbeArguments]:
    return StrictArgumentParser((BackboneArguments, ProbeDataArguments, ProbeArguments)).parse(argv)


def check_arguments(backbone: BackboneArguments, data: ProbeDataArguments, probe: ProbeArguments) -> None:
    """Cheap checks, before any dataset or model is loaded."""
    check_not_group(backbone.model_name_or_path, "model_name_or_path")
    if data.task not in TASKS:
        raise ValueError(f"task={data.task!r} is not supported; expected one of {list(TASKS)}")
    if backbone.dtype not in DTYPES:
        raise ValueError(f"dtype={backbone.dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    if not probe.learning_rates or min(probe.learning_rates) <= 0:
        raise ValueError(f"learning_rates={probe.learning_rates}: give one or more positive values")
    if len(set(probe.learning_rates)) != len(probe.learning_rates):
        raise ValueError(f"learning_rates={probe.learning_rates}: values must be distinct")
    if probe.augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation={probe.augmentation!r} is not supported; expected one of {list(AUGMENTATIONS)}")
    if not 0 < probe.held_out_fraction < 1:
        raise ValueError(f"held_out_fraction={probe.held_out_fraction} must lie strictly between 0 and 1")
    if probe.epochs is not None and probe.epochs < 1:
        raise ValueError(f"epochs={probe.epochs} must be at least 1")
    if data.task != "image-classification" and (data.extra_test_datasets or data.imagenet_r_dataset):
        raise ValueError("extra_test_datasets / imagenet_r_dataset: only for --task image-classification")


def split_spec(spec: str, default_split: str) -> tuple[str, str]:
    """`NAME[:SPLIT]` → (name, split)."""
    name, _, split = spec.rpartition(":") if ":" in spec else (spec, "", "")
    return name, split or default_split


def declared_classes(data: ProbeDataArguments, dataset) -> int | None:
    """Classes the dataset (a ClassLabel column) or --num_labels declares; None: read them off the labels."""
    if data.task == "image-segmentation":
        return data.num_labels
    feature = dataset.features.get(data.label_column)
    return len(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def build_probe(data: ProbeDataArguments, num_classes: int | None, train_targets: torch.Tensor) -> ClassificationProbe:
    if data.task == "depth-estimation":
        return DepthProbe(max_depth=data.max_depth)
    if num_classes is None:  # the largest training label + 1
        labels = train_targets[train_targets != IGNORE_INDEX] if data.task == "image-segmentation" else train_targets
        num_classes = int(labels.max()) + 1
    return SegmentationProbe(num_classes) if data.task == "image-segmentation" else ClassificationProbe(num_classes)


def check_imagenet_r_head(data: ProbeDataArguments, num_classes: int | None) -> None:
    if data.imagenet_r_dataset and num_classes not in (None, 1000):
        raise ValueError(
            f"imagenet_r_dataset: needs an ImageNet-1k head (1000 classes); {data.dataset_name!r} has {num_classes} classes"
        )


def load_split(name: str, split: str, data: ProbeDataArguments, max_samples: int | None):
    dataset = load_image_dataset(name, data.dataset_config if name == data.dataset_name else None, split,
                                 data.image_column, streaming=False, revision=data.dataset_revision if name == data.dataset_name else None)  # fmt: skip
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"dataset_name={name!r}: split {split!r} is empty")
    check_probe_example(dataset[0], data.task, data.image_column, data.label_column, f"{name!r} [{split}]")
    return dataset


def main(argv: list[str] | None = None) -> dict:
    backbone_args, data_args, probe_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    check_arguments(backbone_args, data_args, probe_args)
    start = time.perf_counter()
    # Without an accelerator the processes `accelerate launch` starts join as CPU ranks over gloo;
    # otherwise Accelerate leaves each one alone, evaluating everything and printing its own table.
    accelerator = Accelerator(cpu=not has_accelerator())
    if probe_args.augmentation != "none" and accelerator.num_processes > 1:
        raise ValueError("augmentation: the augmented probe runs in one process; drop `accelerate launch` or use --augmentation none")
    set_seed(probe_args.seed)

    # Datasets first: a wrong column or shape fails before the backbone is loaded.
    train_set = load_split(data_args.dataset_name, data_args.train_split, data_args, data_args.max_train_samples)
    test_sets = [(data_args.dataset_name, data_args.test_split, None)]
    test_sets += [(*split_spec(spec, data_args.test_split), None) for spec in data_args.extra_test_datasets]
    if data_args.imagenet_r_dataset:
        test_sets.append((*split_spec(data_args.imagenet_r_dataset, data_args.test_split), imagenet_r_logit_indices()))
    test_data = [(name, split, indices, load_split(name, split, data_args, data_args.max_test_samples)) for name, split, indices in test_sets]
    num_classes = declared_classes(data_args, train_set)
    check_imagenet_r_head(data_args, num_classes)

    model = load_backbone(backbone_args.model_name_or_path, trust_remote_code=backbone_args.trust_remote_code)
    vit = resolve_vit(model, "model_name_or_path")
    if not -vit.depth <= backbone_args.layer < vit.depth:
        raise ValueError(f"layer={backbone_args.layer} is out of range for a {vit.depth}-block backbone")
    block = backbone_args.layer % vit.depth
    processor = AutoImageProcessor.from_pretrained(backbone_args.model_name_or_path, trust_remote_code=backbone_args.trust_remote_code)
    mean, std, _ = image_processor_stats(processor, vit.input_normalization)
    transform = ProbeTransform(data_args.task, mean, std, vit.image_size, data_args.image_column, data_args.label_column,
                               data_args.reduce_labels, data_args.depth_scale)  # fmt: skip
    dtype = DTYPES[backbone_args.dtype]
    if backbone_args.dtype == "auto" and accelerator.device.type == "cuda":
        dtype = torch.bfloat16
    weights = weights_digest(model) if probe_args.feature_cache_dir else None

    def loader(dataset, image_transform) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset.with_transform(image_transform), batch_size=probe_args.extraction_batch_size,
                                           num_workers=probe_args.num_workers, collate_fn=collate_probe_batch)  # fmt: skip

    def extract(data_loader, description: str):
        return extract_features(model, data_loader, data_args.task in DENSE_TASKS, block, accelerator, dtype, description)

    def features(name: str, split: str, dataset):
        key = {
            "backbone": backbone_args.model_name_or_path, "weights": weights, "layer": block, "dtype": str(dtype),
            "dataset": name, "config": data_args.dataset_config, "revision": data_args.dataset_revision, "split": split,
            "num_examples": len(dataset), "task": data_args.task, "image_column": data_args.image_column,
            "label_column": data_args.label_column, "image_size": vit.image_size, "mean": mean, "std": std,
            "reduce_labels": data_args.reduce_labels, "depth_scale": data_args.depth_scale,
        }  # fmt: skip
        return cached_features(probe_args.feature_cache_dir, key, lambda: extract(loader(dataset, transform), f"{name} [{split}]"),
                               write=accelerator.is_main_process)  # fmt: skip

    train_features = features(data_args.dataset_name, data_args.train_split, train_set)
    test_features = [(name, split, indices, dataset, features(name, split, dataset)) for name, split, indices, dataset in test_data]
    if not accelerator.is_main_process:
        return {}  # the heads are cheap: the main process trains them on the gathered features

    augmented = None
    if probe_args.augmentation == "paper":
        train_transform = ProbeTransform(data_args.task, mean, std, vit.image_size, data_args.image_column, data_args.label_column,
                                         data_args.reduce_labels, data_args.depth_scale, augmentation="paper")  # fmt: skip

        def augmented_epoch(indices: torch.Tensor, epoch: int):
            torch.manual_seed(1_000_003 * probe_args.seed + epoch)  # epoch e's draws depend on (seed, e) only
            subset = train_set.select(indices.tolist())
            return extract(loader(subset, train_transform), f"{data_args.train_split}, augmented, epoch {epoch + 1}")

        augmented = AugmentedFeatures(augmented_epoch, torch.arange(len(train_set)))

    probe = build_probe(data_args, num_classes, train_features.targets)
    check_imagenet_r_head(data_args, getattr(probe, "num_classes", None))
    epochs = probe_args.epochs or PAPER_EPOCHS[data_args.task]
    fitted = fit_probe(probe, train_features, probe_args.learning_rates, epochs, probe_args.batch_size,
                       probe_args.seed, probe_args.held_out_fraction, accelerator.device, progress=True, augmented=augmented)  # fmt: skip
    settings = {
        "head": probe.head,
        "feature": f"output of block {block} of blocks 0–{vit.depth - 1}, before the final norm",
        "optimizer": f"SGD, momentum {MOMENTUM}, weight decay {WEIGHT_DECAY:g}, cosine schedule per step",
        "epochs": epochs,
        "batch_size": probe_args.batch_size,
        "learning_rates": fitted.learning_rates,
        "selected_learning_rate": fitted.learning_rate,
        "selection_rule": fitted.selection_rule,
        "held_out_scores": {lr: round(score, 4) for lr, score in fitted.held_out_scores.items()},
        "num_train_examples": fitted.num_train_examples,
        "train_split": data_args.train_split,
        "max_train_samples": data_args.max_train_samples,
        "augmentation": (
            f"paper: {paper_augmentation(data_args.task, vit.image_size)[1]}; training images re-augmented and run "
            "through the backbone every epoch, held-out and test images with the preprocessing below"
            if probe_args.augmentation == "paper"
            else "none: features extracted once, training images with the preprocessing below (a deviation from the paper)"
        ),
        "preprocessing": (
            f"resize shorter side to {vit.image_size}, centre crop {vit.image_size}"
            if data_args.task in DENSE_TASKS
            else f"resize {int(vit.image_size * 256 / 224)}, centre crop {vit.image_size}"
        ),
        "extraction_dtype": str(dtype or torch.float32).removeprefix("torch."),
        "seed": probe_args.seed,
    }
    if data_args.task == "image-segmentation":
        settings.update(num_classes=probe.num_classes, ignore_index=IGNORE_INDEX, reduce_labels=data_args.reduce_labels,
                        miou="dataset-level: one confusion matrix over the split, classes absent from labels and predictions skipped")  # fmt: skip
    if data_args.task == "depth-estimation":
        settings.update(bins=probe.bins, max_depth_m=probe.max_depth, temperature=probe.temperature, depth_scale=data_args.depth_scale,
                        averaging="RMSE, abs-rel and δ per image over valid pixels (0 < d < max depth), averaged over images")  # fmt: skip
    results = []
    for name, split, indices, dataset, test in test_features:
        metrics = evaluate_heads(probe, fitted.heads, test, probe_args.batch_size, indices)[fitted.selected]
        entry_settings = dict(settings)
        if indices is not None:
            entry_settings["label_mapping"] = "ImageNet-R: the head's 1000 logits restricted to its 200 classes, in its label order"
        results.append({
            "task": data_args.task,
            "dataset": {"name": public_name(name), "config": data_args.dataset_config if name == data_args.dataset_name else None,
                        "split": split, "revision": data_args.dataset_revision if name == data_args.dataset_name else None,
                        "num_examples": len(dataset)},
            "metrics": metric_entries(probe, metrics),
            "settings": entry_settings,
        })  # fmt: skip
    feature_tokens = {
        "image-classification": summary_name(vit),
        "image-segmentation": "patch tokens",
        "depth-estimation": f"patch tokens ⊕ {summary_name(vit)}",
    }[data_args.task]
    try:
        package_version = version("singer-hf")
    except PackageNotFoundError:
        package_version = None
    output = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "backbone": {
            "name_or_path": public_name(backbone_args.model_name_or_path),
            "model_type": vit.backbone.config.model_type,
            "feature": f"{feature_tokens} of block {block} of blocks 0–{vit.depth - 1}, before the final norm",
            "num_parameters": sum(p.numel() for p in vit.backbone.parameters()),
        },
        "seed": probe_args.seed,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "singer_hf_version": package_version,
        "results": results,
    }
    directory = Path(probe_args.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(output, indent=2, ensure_ascii=False) + "\n")
    table = markdown_table(output)
    (directory / "results.md").write_text(table)
    print(table)
    return output


def cli() -> None:
    """`singer-evaluate` and `python scripts/evaluate.py`: `main` with its errors as one line (exit status 2)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
