"""Frozen-backbone features for the probes, read through the architecture table, extracted once.

Probes train for 150–200 epochs on features of a frozen backbone; without augmentation those
features never change, so they are extracted once (batched, bf16 on GPU, across Accelerate
processes) and kept in memory or in safetensors shards on disk. A probe epoch is then a matrix
multiply, not a backbone pass. With augmentation (`AugmentedFeatures`) the training split is run
through the backbone again every epoch, on freshly augmented images, and nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..architectures import ResolvedViT, resolve_vit

INDEX_FILE = "index.json"
SHARD_BYTES = 2**30


@dataclass
class FeatureSet:
    """Features of N images and their targets (labels N, masks N×H×W or depth maps N×H×W)."""

    summary: torch.Tensor
    """N×D: the CLS token, or the mean patch token for a backbone without one."""
    patches: torch.Tensor | None
    """N×P×D patch tokens in raster order (None when only the summary is kept)."""
    targets: torch.Tensor
    grid: tuple[int, int]
    """(rows, columns) of the patch grid."""

    def __len__(self) -> int:
        return len(self.targets)

    def select(self, indices: torch.Tensor) -> FeatureSet:
        patches = None if self.patches is None else self.patches[indices]
        return FeatureSet(self.summary[indices], patches, self.targets[indices], self.grid)

    def for_epoch(self, epoch: int) -> FeatureSet:
        """The same features every epoch (no augmentation)."""
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"summary": self.summary, "targets": self.targets}
        if self.patches is not None:
            tensors["patches"] = self.patches
        return tensors


@dataclass
class AugmentedFeatures:
    """Training features recomputed every epoch from freshly augmented images, never cached.
    Trains the heads like a `FeatureSet` (`len`, `select`, `for_epoch`)."""

    extract: Callable[[torch.Tensor, int], FeatureSet]
    """(indices into the training split, epoch) → features of those images, freshly augmented."""
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)

    def select(self, indices: torch.Tensor) -> AugmentedFeatures:
        return AugmentedFeatures(self.extract, self.indices[indices])

    def for_epoch(self, epoch: int) -> FeatureSet:
        return self.extract(self.indices, epoch)


def summary_name(vit: ResolvedViT) -> str:
    return "CLS token" if vit.has_class_token else "mean patch token (the backbone has no CLS token)"


def split_tokens(vit: ResolvedViT, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summary B×D, patches B×P×D) of a block output B×N×D: the first CLS (summary) token, or the
    mean patch token of a backbone without one (registers are no summary)."""
    patches = tokens[:, vit.num_prefix_tokens :]
    summary = tokens[:, 0] if vit.has_class_token else patches.mean(1)
    return summary, patches


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    keep_patches: bool,
    layer: int = -1,
    accelerator: Accelerator | None = None,
    autocast_dtype: torch.dtype | None = None,
    description: str = "features",
) -> FeatureSet:
    """Runs the frozen backbone once over `loader` (batches of `pixel_values` and `targets`).

    `layer` indexes `resolve_vit(model).block_outputs` (−1: the last block's output before the
    final norm, what SiNGER distils and the paper probes). Under `accelerate launch` each process
    reads its share of the batches and every process gets all features back, in dataset order.
    """
    vit = resolve_vit(model)
    accelerator = accelerator or Accelerator()
    vit.backbone.eval().to(accelerator.device)
    loader = accelerator.prepare_data_loader(loader)
    side = vit.image_size // vit.patch_size
    parts: dict[str, list[torch.Tensor]] = {"summary": [], "patches": [], "targets": []}
    autocast = torch.autocast(accelerator.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for batch in tqdm(loader, desc=description, disable=not accelerator.is_local_main_process):
        with autocast:
            summary, patches = split_tokens(vit, vit.block_outputs(batch["pixel_values"])[layer])
        local = {"summary": summary, "targets": batch["targets"]}
        if keep_patches:
            local["patches"] = patches
        for name, tensor in accelerator.gather_for_metrics(local).items():
            parts[name].append(tensor.cpu())
    if not parts["targets"]:
        raise ValueError(f"{description}: the dataset is empty")
    patches = torch.cat(parts["patches"]) if keep_patches else None
    return FeatureSet(torch.cat(parts["summary"]), patches, torch.cat(parts["targets"]), (side, side))


def save_features(features: FeatureSet, directory: str | Path, key: dict) -> None:
    """Safetensors shards of about 1 GiB plus an index; the index is written last, so a partly
    written cache is never read back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = features.tensors()
    bytes_per_example = sum(t[0].numel() * t.element_size() for t in tensors.values())
    per_shard = max(1, SHARD_BYTES // bytes_per_example)
    shards = []
    for number, start in enumerate(range(0, len(features), per_shard)):
        name = f"shard-{number:05d}.safetensors"
        save_file({k: t[start : start + per_shard].contiguous() for k, t in tensors.items()}, str(directory / name))
        shards.append(name)
    index = {"key": key, "num_examples": len(features), "grid": list(features.grid), "shards": shards}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))


def load_features(directory: str | Path) -> FeatureSet:
    directory = Path(directory)
    index = json.loads((directory / INDEX_FILE).read_text())
    shards = [load_file(str(directory / name)) for name in index["shards"]]
    tensors = {name: torch.cat([shard[name] for shard in shards]) for name in shards[0]}
    return FeatureSet(tensors["summary"], tensors.get("patches"), tensors["targets"], tuple(index["grid"]))


def cache_key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """Hash of every parameter and buffer, so a cache never outlives the weights it came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_features(
    cache_dir: str | Path | None, key: dict, extract: Callable[[], FeatureSet], write: bool = True
) -> FeatureSet:
    """`extract()` once per `key`: from `cache_dir/<digest of key>/` when it holds a complete
    cache, otherwise extracted and (when `write`, e.g. on the main process only) saved there.
    Without `cache_dir` the features live in memory for this run only."""
    if cache_dir is None:
        return extract()
    directory = Path(cache_dir) / cache_key_digest(key)
    if (directory / INDEX_FILE).is_file():
        return load_features(directory)
    features = extract()
    if write:
        save_features(features, directory, key)
    return features
