"""High-norm artifact diagnostics: statistics of patch-token norms and figures (matplotlib).

ViTs trained long enough put a few patch tokens, mostly in low-information background, at norms
far above the rest and use them as global scratch space (Darcet et al., "Vision Transformers Need
Registers", 2024); SiNGER's adapters exist to remove them from the teacher's features before
distillation. `artifact_stats` summarises a sample of features with the per-image statistics of
`artifacts.norm_statistics`, the outlier definition (norm above `outlier_ratio` × its image's median
patch norm) the trainer logs with; the figures serve scripts/diagnose.py and the figures a training
run writes at its end.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .artifacts import DEFAULT_OUTLIER_RATIO, norm_statistics, patch_norms

DEFAULT_QUANTILES = (0.5, 0.9, 0.97, 0.99, 1.0)
MARKED_QUANTILE = 0.97
"""The quantile SiNGER's outlier loss penalises norms above (docs/method.md §5), marked on histograms."""


def artifact_stats(
    features: torch.Tensor,
    prefix_tokens: int,
    outlier_ratio: float = DEFAULT_OUTLIER_RATIO,
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES,
) -> dict:
    """Statistics of high-norm patch tokens over a sample of images (B×N×D, before the final norm).

    - `max_median_ratio`: per image, its largest patch norm over its median patch norm; mean,
      median and max over the images (≈1–2 without artifacts, ≫ 1 with them);
    - `outlier_share`: share of all patch tokens above `outlier_ratio` × their image's median,
      and `outliers_per_image`;
    - `patch_norm_quantiles`: quantiles of all patch norms of the sample;
    - `cls_norm`: mean and median norm of the first prefix token (None without prefix tokens).
    """
    norms = patch_norms(features, prefix_tokens)
    per_image = norm_statistics(norms, outlier_ratio)
    ratios, shares = per_image["max_median"], per_image["outlier_share"]
    levels = torch.tensor(quantiles, dtype=torch.float32)
    values = torch.quantile(norms.flatten(), levels) if norms.numel() <= 2**24 else torch.quantile(norms.flatten()[::16], levels)
    stats = {
        "num_images": norms.shape[0],
        "patch_tokens_per_image": norms.shape[1],
        "max_median_ratio": {"mean": ratios.mean().item(), "median": ratios.median().item(), "max": ratios.max().item()},
        "outlier_ratio": outlier_ratio,
        "outlier_share": shares.mean().item(),
        "outliers_per_image": (shares * norms.shape[1]).mean().item(),
        "patch_norm_quantiles": {f"{q:g}": v.item() for q, v in zip(quantiles, values)},
        "cls_norm": None,
    }
    if prefix_tokens > 0:
        cls = features[:, 0].float().norm(dim=-1)
        stats["cls_norm"] = {"mean": cls.mean().item(), "median": cls.median().item()}
    return stats


def cosine_map(patches: torch.Tensor, query: int) -> torch.Tensor:
    """Cosine similarity of every patch token (P×D) to patch `query` (the paper's Figure 2)."""
    unit = torch.nn.functional.normalize(patches.float(), dim=-1)
    return unit @ unit[query]


def cosine_gram(patches: torch.Tensor) -> torch.Tensor:
    """P×P cosine-similarity (Gram) matrix of the patch tokens: artifact tokens show as stripes."""
    unit = torch.nn.functional.normalize(patches.float(), dim=-1)
    return unit @ unit.T


def _grid(values: torch.Tensor) -> torch.Tensor:
    side = math.isqrt(values.shape[-1])
    return values.reshape(*values.shape[:-1], side, side)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def norm_maps_figure(images: torch.Tensor, norms: dict[str, torch.Tensor], path: str | Path):
    """One row per image (H×W×3 in [0, 1]); its patch-norm map under each view (B×P each).

    The views of a row share one colour scale (the row's smallest to largest norm, one colour bar),
    so a view whose norms stay low looks dim beside one with high-norm artifacts, instead of every
    panel spanning the whole colour map. Returns the (closed) figure, after saving it."""
    plt = _pyplot()
    rows, columns = images.shape[0], 1 + len(norms)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns + 0.6, 2.2 * rows + 0.4), squeeze=False, layout="constrained")
    for row in range(rows):
        axes[row, 0].imshow(images[row].numpy())
        row_norms = torch.cat([values[row].flatten() for values in norms.values()])  # views may have different grids
        limits = {"vmin": row_norms.min().item(), "vmax": row_norms.max().item()}
        for column, (name, values) in enumerate(norms.items(), start=1):
            shown = axes[row, column].imshow(_grid(values[row]).numpy(), cmap="viridis", **limits)
            if row == 0:
                axes[row, column].set_title(name, fontsize=8)
        figure.colorbar(shown, ax=axes[row, 1:].tolist(), fraction=0.05, pad=0.02).set_label("patch norm", fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle("Patch-token norms: one colour scale per row, shared by the views of its image", fontsize=10)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return figure


def norm_histograms_figure(norms: dict[str, torch.Tensor], path: str | Path, outlier_ratio: float = DEFAULT_OUTLIER_RATIO):
    """Histogram of all patch norms per view, the 0.97 quantile and `outlier_ratio` × median marked.

    Each x axis spans its view's norms (a few percent of margin); an outlier cut beyond the largest
    norm is only named in the legend, with its value, instead of stretching the axis until the data
    is squashed to the left. Counts are on a log axis, so a few outliers show.
    Returns the (closed) figure, after saving it."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(norms), figsize=(3.2 * len(norms), 3.4), squeeze=False, layout="constrained")
    for axis, (name, values) in zip(axes[0], norms.items()):
        flat = values.flatten().float()
        low, high = flat.min().item(), flat.max().item()
        margin = 0.03 * max(high - low, 1e-6)
        axis.hist(flat.numpy(), bins=60, color="tab:blue", log=True)
        axis.set_xlim(low - margin, high + margin)
        axis.axvline(torch.quantile(flat, MARKED_QUANTILE).item(), color="tab:orange", label=f"q{MARKED_QUANTILE:g}")
        cut = outlier_ratio * flat.median().item()
        label = f"{outlier_ratio:g}× median ({cut:.3g})"
        if cut <= high + margin:
            axis.axvline(cut, color="tab:red", linestyle="--", label=label)
        else:  # beyond every norm of this view (no token is an outlier): named in the legend, not drawn
            axis.plot([], [], color="tab:red", linestyle="--", label=f"{label},\nbeyond the axis →")
        axis.set_title(name, fontsize=8)
        axis.set_xlabel("patch norm", fontsize=8)
        axis.set_ylabel("tokens (log scale)", fontsize=8)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)  # below: never over the bars
    figure.suptitle("Patch-norm histograms: log counts; each x axis spans its view's norms (clipped to the data)", fontsize=9)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return figure


def comparison_figure(image: torch.Tensor, views: dict[str, torch.Tensor], query: int, path: str | Path):
    """One image, one row per view (P×D patch tokens: raw teacher, refined teacher, student):
    patch-norm map, cosine map from patch `query` of the first view's grid (marked; a view on another
    grid is queried at the patch in the same place), cosine Gram matrix.

    Each column has one colour scale for all rows: the norm maps share the smallest to largest norm
    of all views of the image, the cosine panels span [-1, 1]. Returns the (closed) figure, after saving it."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(views), 4, figsize=(9.6, 2.2 * len(views) + 0.5), squeeze=False, layout="constrained")
    side = math.isqrt(next(iter(views.values())).shape[0])
    norms = {name: patches.float().norm(dim=-1) for name, patches in views.items()}
    everything = torch.cat(list(norms.values()))
    norm_limits = {"vmin": everything.min().item(), "vmax": everything.max().item()}
    shown = {}
    for row, (name, patches) in enumerate(views.items()):
        own_side = math.isqrt(patches.shape[0])
        at = [int((index + 0.5) * own_side / side) for index in divmod(query, side)]  # (row, column) on this view's grid
        own_query = at[0] * own_side + at[1]
        axes[row, 0].imshow(image.numpy())
        axes[row, 0].set_ylabel(name, fontsize=8)
        panels = (
            (_grid(norms[name]), "viridis", norm_limits, "patch norm"),
            (_grid(cosine_map(patches, own_query)), "coolwarm", {"vmin": -1, "vmax": 1}, "cosine to ×"),
            (cosine_gram(patches), "coolwarm", {"vmin": -1, "vmax": 1}, "cosine Gram"),
        )
        for column, (values, cmap, limits, title) in enumerate(panels, start=1):
            shown[column] = axes[row, column].imshow(values.numpy(), cmap=cmap, **limits)
            if row == 0:
                axes[row, column].set_title(title, fontsize=9)
        axes[row, 2].plot(at[1], at[0], "kx", markersize=8)
    for column, mappable in shown.items():
        bar = figure.colorbar(mappable, ax=axes[:, column].tolist(), fraction=0.08, pad=0.02, location="bottom")
        bar.set_label("patch norm" if column == 1 else "cosine similarity", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("One colour scale per column, shared by all views", fontsize=10)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return figure


def artifact_history_figure(
    log_history: list[dict], path: str | Path, statistics: tuple[str, ...] = ("outlier_share",), prefix: str = "artifacts/"
):
    """One row per statistic, one column per distilled teacher block: each view's value over the
    training steps, from a run's logged artifact statistics (`trainer_state.json`'s `log_history`,
    keys `<prefix><view>/<layer>/<statistic>`). Returns the (closed) figure, after saving it."""
    series: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}  # (statistic, layer) → view → points
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith(prefix):
                *view, layer, statistic = key[len(prefix) :].split("/")
                if statistic in statistics:
                    series.setdefault((statistic, layer), {}).setdefault("/".join(view), []).append((entry["step"], value))
    if not series:
        raise ValueError(f"log_history: no {prefix}<view>/<layer>/<statistic> entries; was the run trained with --artifact_stats?")
    plt = _pyplot()
    layers = sorted({layer for _, layer in series}, key=int)
    figure, axes = plt.subplots(len(statistics), len(layers), figsize=(3.6 * len(layers), 2.5 * len(statistics) + 0.3),
                                squeeze=False, layout="constrained", sharex=True)  # fmt: skip
    for row, statistic in enumerate(statistics):
        share = statistic == "outlier_share"
        for column, layer in enumerate(layers):
            axis = axes[row, column]
            for view, points in series.get((statistic, layer), {}).items():
                steps, values = zip(*points)
                axis.plot(steps, [100 * value if share else value for value in values], marker=".", label=view.replace("_", " "))
            if row == 0:
                axis.set_title(f"teacher block {layer}", fontsize=9)
            if row == len(statistics) - 1:
                axis.set_xlabel("step", fontsize=8)
            if column == 0:
                axis.set_ylabel("outlier share (%)" if share else statistic.replace("_", "/"), fontsize=8)
            axis.tick_params(labelsize=7)
            axis.legend(fontsize=7)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return figure
