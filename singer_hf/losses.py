"""SiNGER's loss terms (docs/method.md). Each loss has exactly one implementation here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_mse(prediction: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over all elements, or over the tokens where `token_mask` (B×N) is True.

    Computed in float32 (what autocast does for `mse_loss` too), so a bf16 teacher target and a
    float32 student prediction can meet outside autocast.
    """
    prediction, target = prediction.float(), target.float()
    if token_mask is None:
        return F.mse_loss(prediction, target)
    squared = (prediction - target).pow(2) * token_mask.unsqueeze(-1)
    return squared.sum() / (token_mask.sum() * prediction.shape[-1]).clamp(min=1)


def outlier_loss(patches: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mean of (‖x‖ − t_b)² over patch tokens whose norm is strictly above t_b, their image's
    `quantile` of patch norms (linear interpolation, no gradient through t_b); 0 if there are none.

    Written without data-dependent branching, so it costs no host synchronisation.
    """
    norms = patches.float().norm(dim=-1)  # B×P
    thresholds = torch.quantile(norms.detach(), quantile, dim=1, keepdim=True)
    excess = norms - thresholds
    above = excess > 0
    return (excess.clamp(min=0).pow(2) * above).sum() / above.sum().clamp(min=1)


def gram_loss(patches: torch.Tensor, reference_patches: torch.Tensor) -> torch.Tensor:
    """MSE between the cosine Gram matrices (B×P×P) of two token sets: relational geometry."""
    # float32 even under bf16 autocast: cosines near 1 would round to steps of ~0.004 in bf16.
    a = F.normalize(patches.float(), dim=-1)
    b = F.normalize(reference_patches.float(), dim=-1)
    return feature_mse(a @ a.transpose(1, 2), b @ b.transpose(1, 2))
