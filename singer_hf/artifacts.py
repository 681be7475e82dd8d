"""High-norm artifact statistics of patch tokens: the one definition the trainer's logs and
scripts/diagnose.py share.

A patch token is an outlier when its L2 norm exceeds `outlier_ratio` × the median patch norm of its
own image (default 4; an absolute cut, as Darcet et al. use for DINOv2 ViT-g, does not carry over
between models). `ArtifactViews` collects, during a training step, the patch norms of the features
a method's losses already compared, so the statistics cost no extra forward.
"""

from __future__ import annotations

import torch

DEFAULT_OUTLIER_RATIO = 4.0
STATISTICS = ("outlier_share", "max_median", "p99_median")
"""Per image: share of patch tokens above `outlier_ratio` × the median, max / median, 0.99 quantile / median."""
VIEWS = ("teacher", "refined_teacher", "student")
"""The teacher's block output, SiNGER's adapter-refined feature, the student's projected feature (what KD compares)."""


def patch_norms(features: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """L2 norm of every patch token: B×N×D block output → B×P (prefix tokens dropped), float32."""
    if features.ndim != 3:
        raise ValueError(f"features: expected a B×N×D block output, got shape {tuple(features.shape)}")
    if not 0 <= prefix_tokens < features.shape[1]:
        raise ValueError(f"prefix_tokens: must lie in [0, {features.shape[1] - 1}] for {features.shape[1]} tokens, got {prefix_tokens}")
    return features[:, prefix_tokens:].float().norm(dim=-1)


def norm_statistics(norms: torch.Tensor, outlier_ratio: float = DEFAULT_OUTLIER_RATIO) -> dict[str, torch.Tensor]:
    """`STATISTICS` of each image from its patch norms (…×P → … each), on the norms' device.

    The median is `torch.median`'s (the lower of the two middle values), the 0.99 quantile
    interpolates linearly; a zero median counts as the smallest positive float."""
    median = norms.median(dim=-1).values
    floor = median.clamp(min=torch.finfo(torch.float32).tiny)
    return {
        "outlier_share": (norms > outlier_ratio * median.unsqueeze(-1)).float().mean(dim=-1),
        "max_median": norms.amax(dim=-1) / floor,
        "p99_median": torch.quantile(norms, 0.99, dim=-1) / floor,
    }


class ArtifactViews:
    """Patch norms of the features a method compared, by (view, distilled teacher block).

    A method's `losses(..., views=ArtifactViews())` adds each feature once it has it; only the
    detached B×P norms are kept (no graph, no feature held)."""

    def __init__(self):
        self.norms: dict[tuple[str, int], torch.Tensor] = {}

    def add(self, view: str, layer: int, features: torch.Tensor, prefix_tokens: int) -> None:
        with torch.no_grad():
            self.norms[view, int(layer)] = patch_norms(features.detach(), prefix_tokens)

    def statistics(self, outlier_ratio: float = DEFAULT_OUTLIER_RATIO) -> dict[str, torch.Tensor]:
        """`<view>/<layer>/<stat>` → the batch mean (a 0-dim device tensor, not read: no host sync).
        Views of one shape (all of them on the teacher's patch grid) are reduced together."""
        groups: dict[tuple[int, ...], list[tuple[str, int]]] = {}
        for key, norms in self.norms.items():
            groups.setdefault(tuple(norms.shape), []).append(key)
        result = {}
        for keys in groups.values():
            stats = norm_statistics(torch.stack([self.norms[key] for key in keys]), outlier_ratio)
            means = {name: values.mean(dim=-1) for name, values in stats.items()}
            for index, (view, layer) in enumerate(keys):
                result.update({f"{view}/{layer}/{name}": means[name][index] for name in STATISTICS})
        return result
