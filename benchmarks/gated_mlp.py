#!/usr/bin/env python
"""SiNGER's nullspace on gated MLPs and the threshold rule per family: the measurements behind docs/gated_mlp.md.

    python benchmarks/gated_mlp.py                                  # about 20 CPU minutes
    python benchmarks/gated_mlp.py --train_steps 20 --eval_images 128 --adapter_steps 5 --output_dir outputs/gated-smoke

1. Trained-like weights. Two small DINOv3 ViTs (RoPE, CLS + 4 registers, LayerScale; 28 px Fashion-MNIST,
   4 px patches) are trained on the labels from the same seed: one with a gated MLP
   `down(act(gate(x)) ⊙ up(x))`, one with a plain `fc2(act(fc1(x)))`. Random Gaussian weights have no
   structure to find a nullspace in; briefly trained ones do.
2. Which matrix. For every block l followed by a block l+1, the adapter R(F) = F + (F Nᵀ) N is built on
   the patch tokens of F = F^l from the r directions of least singular value of each candidate matrix
   (or r random unit rows), and the information-preservation error through the real block l+1
       E = ‖B_{l+1}(R(F)) − B_{l+1}(F)‖² / ‖B_{l+1}(F)‖²
   is measured on held-out images, at initialisation and after a short adapter-only training on that
   loss. "beyond residual" is the part of E not carried by the residual connection (Δ itself): what
   attention and the MLP make of Δ, the part a nullspace can remove.
3. Which threshold. How many directions the paper's absolute rule σ < τ and the relative rule
   σ < τ·σ_max keep, on every family's test stand-in and on the trained models, and E of the bases
   they give (SiNGER's selection: the first r below the threshold in descending σ, then random rows).

Prints the tables and writes `results.json` to `output_dir`; the trained models are kept there and
reused.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from singer_hf import resolve_vit  # noqa: E402
from singer_hf.architectures import load_backbone  # noqa: E402
from singer_hf.cli import StrictArgumentParser, run_cli  # noqa: E402
from singer_hf.demo.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist  # noqa: E402
from singer_hf.tuner import nullspace_directions  # noqa: E402
from singer_hf.tuner.layer import basis_with_count, nullspace_matrix  # noqa: E402

@dataclass
class StudyArguments:
    output_dir: str = field(default="outputs/gated_mlp", metadata={"help": "Where the trained models and results.json go."})
    width: int = field(default=96, metadata={"help": "Token width D of the trained ViTs."})
    depth: int = field(default=6, metadata={"help": "Blocks of the trained ViTs."})
    gated_hidden: int = field(default=256, metadata={"help": "Hidden width of the gated MLP (about 8/3 D, as SwiGLU ViTs)."})
    plain_hidden: int = field(default=384, metadata={"help": "Hidden width of the plain MLP (4 D)."})
    layer_scale: float = field(default=0.1, metadata={"help": "LayerScale initial value."})
    train_steps: int = field(default=300, metadata={"help": "Training steps of each ViT at batch 128 (469: one epoch)."})
    rank: int = field(default=12, metadata={"help": "Adapter rank r (D/8)."})
    null_threshold: float = field(default=0.05, metadata={"help": "τ of both threshold rules."})
    eval_images: int = field(default=1024, metadata={"help": "Held-out images E is measured on."})
    adapter_steps: int = field(default=100, metadata={"help": "Adapter-only training steps on the information loss."})
    adapter_images: int = field(default=1024, metadata={"help": "Training images of the adapter-only training."})
    seed: int = field(default=0)
    threads: int = field(default=1, metadata={"help": "CPU threads (one is the most efficient on a shared CPU)."})


def fashion_mnist(split: str, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_fashion_mnist(split)
    if count is not None:
        data = data.select(range(count))
    images = np.stack([np.asarray(image) for image in data["image"]])
    pixels = (torch.from_numpy(images).float().div(255) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return pixels[:, None], torch.tensor(data["label"])


def train_vit(args: StudyArguments, gated: bool, folder: Path) -> nn.Module:
    """A DINOv3 ViT trained on the labels (linear head on the pooled CLS), or the one saved in `folder`."""
    if (folder / "config.json").is_file():
        return load_backbone(str(folder)).eval()
    torch.manual_seed(args.seed)
    config = DINOv3ViTConfig(
        hidden_size=args.width, num_hidden_layers=args.depth, num_attention_heads=4, num_channels=1, image_size=28,
        patch_size=4, num_register_tokens=4, layerscale_value=args.layer_scale, use_gated_mlp=gated,
        intermediate_size=args.gated_hidden if gated else args.plain_hidden, hidden_act="silu" if gated else "gelu",
    )  # fmt: skip
    model, head = DINOv3ViTModel(config), nn.Linear(args.width, 10)
    images, labels = fashion_mnist("train")
    parameters = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.train_steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.perf_counter()
    for step in range(args.train_steps):
        batch = torch.randint(len(images), (128,), generator=generator)
        loss = F.cross_entropy(head(model(pixel_values=images[batch]).pooler_output), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.train_steps - 1:
            print(f"  {'gated' if gated else 'plain'} ViT step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    test_images, test_labels = fashion_mnist("test", 2000)
    with torch.no_grad():
        accuracy = (head(model(pixel_values=test_images).pooler_output).argmax(1) == test_labels).float().mean().item()
    print(f"  {'gated' if gated else 'plain'} ViT: test accuracy {100 * accuracy:.1f} % on 2000 images")
    model.save_pretrained(folder)
    (folder / "accuracy.json").write_text(json.dumps({"test_accuracy": accuracy}))
    return model


def scale_statistics(model: nn.Module) -> dict[str, float]:
    """Mean and per-block coefficient of variation (std / mean over channels) of the pre-MLP norm's
    weight γ and the MLP's LayerScale λ: how far from a uniform scaling folding them would be."""
    blocks = resolve_vit(model).blocks
    stats = {}
    for name, values in (("γ", [b.norm2.weight for b in blocks]), ("λ", [b.layer_scale2.lambda1 for b in blocks])):
        values = torch.stack(values).detach()
        stats[f"{name} mean"] = values.mean().item()
        stats[f"{name} variation"] = (values.std(1) / values.mean(1).abs()).mean().item()
    return stats


def _unit_rows(count: int, dim: int, seed: int) -> torch.Tensor:
    rows = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (rows / rows.norm(dim=1, keepdim=True)).float()


def least_directions(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The r left singular directions of least singular value (σ beyond the matrix's rank counted as 0)."""
    return nullspace_directions(matrix, math.inf)[-rank:].float()


def candidate_matrices(block: nn.Module, mlp) -> dict[str, torch.Tensor]:
    """The matrices whose near-left-nullspace could start the adapter, D×K (float64). "folded": the
    pre-MLP LayerNorm's weight γ scales the rows (x ↦ γ ⊙ x before the MLP), the LayerScale λ after
    the MLP scales the columns (x·M ↦ x·M ⊙ λ)."""
    norm = block.norm2.weight.detach().double()[:, None]
    scale = block.layer_scale2.lambda1.detach().double()[None, :]
    product = nullspace_matrix(mlp)  # (W_fc2 W_fc1)ᵀ, or a gated MLP's value path (W_down W_up)ᵀ
    if mlp.gated:
        joint = torch.cat([mlp.gate, mlp.up]).detach().double().T  # D×2H: directions neither input projection sees
        return {
            "value path (W_down W_up)ᵀ": product,
            "value path, norm + LayerScale folded": norm * product * scale,
            "gate path (W_down W_gate)ᵀ": (mlp.down.detach().double() @ mlp.gate.detach().double()).T,
            "joint input [W_gate; W_up]ᵀ": joint,
            "joint input, norm folded": norm * joint,
        }
    return {
        "product (W_fc2 W_fc1)ᵀ (paper)": product,
        "product, norm + LayerScale folded": norm * product * scale,
        "input W_fc1ᵀ": mlp.up.detach().double().T,
        "input, norm folded": norm * mlp.up.detach().double().T,
    }


def refine(features: torch.Tensor, prefix: int, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    patches = features[:, prefix:]
    return torch.cat([features[:, :prefix], patches + (patches @ down) @ up], dim=1)


def info_errors(vit, layer: int, outputs, down: torch.Tensor, up: torch.Tensor) -> dict[str, float]:
    feature, target = outputs[layer], outputs[layer + 1]
    refined = refine(feature, vit.num_prefix_tokens, down, up)
    with torch.no_grad():
        following = vit.run_block(layer + 1, refined, outputs.block_kwargs)
    difference = following - target
    scale = target.pow(2).sum()
    return {
        "E": (difference.pow(2).sum() / scale).item(),
        "beyond residual": ((difference - (refined - feature)).pow(2).sum() / scale).item(),
    }


def train_adapter(vit, layer: int, outputs, basis: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_d = Nᵀ, W_u = N trained alone on MSE(B_{l+1}(R(F^l)), F^{l+1}) (SiNGER's information loss)."""
    down, up = nn.Parameter(basis.T.clone()), nn.Parameter(basis.clone())
    optimizer = torch.optim.Adam([down, up], lr=1e-3)
    generator = torch.Generator().manual_seed(layer)
    for _ in range(steps):
        batch = torch.randint(len(outputs[layer]), (64,), generator=generator)
        refined = refine(outputs[layer][batch], vit.num_prefix_tokens, down, up)
        loss = F.mse_loss(vit.run_block(layer + 1, refined, outputs.block_kwargs), outputs[layer + 1][batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return down.detach(), up.detach()


def compare_bases(args: StudyArguments, model: nn.Module, evaluation, training) -> dict:
    """E at initialisation and after adapter-only training, per candidate basis, averaged over blocks."""
    vit = resolve_vit(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        held_out, train = vit.block_outputs(evaluation), vit.block_outputs(training)
    results: dict[str, dict[str, list[float]]] = {}
    for layer in range(vit.depth - 1):
        matrices = candidate_matrices(vit.blocks[layer + 1], vit.mlp(layer + 1))
        bases = {name: least_directions(matrix, args.rank) for name, matrix in matrices.items()}
        bases["random unit rows"] = _unit_rows(args.rank, vit.width, args.seed + layer)
        for name, basis in bases.items():
            entry = results.setdefault(name, {})
            for key, value in info_errors(vit, layer, held_out, basis.T, basis).items():
                entry.setdefault(f"{key} at init", []).append(value)
            down, up = train_adapter(vit, layer, train, basis, args.adapter_steps)
            entry.setdefault("E after training", []).append(info_errors(vit, layer, held_out, down, up)["E"])
    return results


RULES = {"absolute σ < τ": False, "relative σ < τ·σ_max": True}


def rule_matrices(mlp) -> dict[str, torch.Tensor]:
    """The matrices the threshold rules are compared on: the paper's product for a plain MLP; for a
    gated one the value path (the product's analogue) and the joint input projections."""
    if not mlp.gated:
        return {"product (W_fc2 W_fc1)ᵀ": nullspace_matrix(mlp)}
    return {"value path (W_down W_up)ᵀ": nullspace_matrix(mlp), "joint input [W_gate; W_up]ᵀ": torch.cat([mlp.gate, mlp.up]).detach().double().T}


def threshold_counts(args: StudyArguments, vit, name: str, evaluation=None) -> list[dict]:
    """Per matrix: directions each rule keeps (mean over blocks) and, on a trained model, E of the
    bases they give (the paper's selection: the first r below the threshold in descending σ, random
    rows after them)."""
    outputs = None
    if evaluation is not None:
        with torch.no_grad():
            outputs = vit.block_outputs(evaluation)
    rows: dict[str, dict] = {}
    for block in range(vit.depth):
        for matrix_name, matrix in rule_matrices(vit.mlp(block)).items():
            row = rows.setdefault(matrix_name, {"model": name, "matrix": matrix_name, "width": vit.width, "counts": {}, "E at init": {}})
            for rule, relative in RULES.items():
                row["counts"].setdefault(rule, []).append(len(nullspace_directions(matrix, args.null_threshold, relative)))
                if outputs is not None and block > 0:
                    generator = torch.Generator().manual_seed(args.seed + block)
                    basis, _ = basis_with_count(matrix, args.rank, args.null_threshold, generator, relative)
                    row["E at init"].setdefault(rule, []).append(info_errors(vit, block - 1, outputs, basis.T, basis)["E"])
    for row in rows.values():
        row["counts"] = {rule: float(np.mean(values)) for rule, values in row["counts"].items()}
        row["E at init"] = {rule: float(np.mean(values)) for rule, values in row["E at init"].items()}
    return list(rows.values())


def stand_in_counts(args: StudyArguments) -> list[dict]:
    """Threshold counts on every family's test stand-in (random init, width 32)."""
    from standins import hf_families, newer_families, save_timm

    writers = {**hf_families(), **newer_families(), "timm_vit": lambda folder: save_timm(folder, "vit_tiny_patch16_224", depth=6)}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, write in writers.items():
            folder = Path(scratch) / name
            write(folder)
            vit = resolve_vit(load_backbone(str(folder)))
            rows += threshold_counts(args, vit, name)
    return rows


def print_table(title: str, rows: list[list], header: list[str]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |")


def main(argv: list[str] | None = None) -> dict:
    (args,) = StrictArgumentParser(StudyArguments).parse(sys.argv[1:] if argv is None else argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print("Training the two ViTs (reused when already in output_dir)")
    models = {kind: train_vit(args, kind == "gated", output / f"{kind}_vit") for kind in ("gated", "plain")}
    test_images, _ = fashion_mnist("test", args.eval_images)
    train_images, _ = fashion_mnist("train", args.adapter_images)

    accuracies = {kind: json.loads((output / f"{kind}_vit" / "accuracy.json").read_text())["test_accuracy"] for kind in models}
    print("Test accuracy (2000 images): " + ", ".join(f"{kind} {100 * value:.1f} %" for kind, value in accuracies.items()))
    scales = {kind: scale_statistics(model) for kind, model in models.items()}
    for kind, stats in scales.items():
        print(f"{kind} ViT: pre-MLP norm γ mean {stats['γ mean']:.3f} (variation across channels {stats['γ variation']:.3f}), "
              f"LayerScale λ mean {stats['λ mean']:.3f} (variation {stats['λ variation']:.3f})")  # fmt: skip
    results = {"arguments": asdict(args), "test_accuracy": accuracies, "scales": scales, "bases": {}, "thresholds": {}}
    for kind, model in models.items():
        per_block = compare_bases(args, model, test_images, train_images)
        results["bases"][kind] = per_block
        rows = [[name, *(float(np.mean(values[key])) for key in ("E at init", "beyond residual at init", "E after training"))]
                for name, values in per_block.items()]  # fmt: skip
        print_table(f"{kind} MLP, r = {args.rank}: information-preservation error E (mean over blocks 1..{args.depth - 1})",
                    rows, ["basis (r least-σ directions of)", "E at init", "beyond residual", f"E after {args.adapter_steps} steps"])  # fmt: skip

    trained = [row for kind, model in models.items() for row in threshold_counts(args, resolve_vit(model), f"trained {kind} ViT", test_images)]
    stand_ins = stand_in_counts(args)
    results["thresholds"] = {"trained": trained, "stand_ins": stand_ins}
    print_table(
        f"Trained ViTs: directions kept per block (mean of {args.depth}) and E of the bases the rules give (r = {args.rank}, τ = {args.null_threshold})",
        [[row["model"], row["matrix"], row["width"], *row["counts"].values(), *row["E at init"].values()] for row in trained],
        ["model", "matrix", "D", "kept, absolute σ < τ", "kept, relative σ < τ·σ_max", "E, absolute", "E, relative"],
    )
    print_table(
        f"Test stand-ins (random init): directions kept per block (mean), τ = {args.null_threshold}",
        [[row["model"], row["matrix"], row["width"], *row["counts"].values()] for row in stand_ins],
        ["family", "matrix", "D", "kept, absolute σ < τ", "kept, relative σ < τ·σ_max"],
    )
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nResults written to {output / 'results.json'}")
    return results


if __name__ == "__main__":
    run_cli(main)
