"""The demo's quick linear probe: full-batch L-BFGS on standardised CLS features of in-memory images.

Deterministic and seconds on CPU for the demo's sizes; the paper's protocol (SGD, cosine, 150
epochs, docs/method.md §8) is `singer_hf.evaluation.train_heads` with `ClassificationProbe`, run by
scripts/evaluate.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import resolve_vit
from ..evaluation.features import split_tokens


@torch.no_grad()
def cls_features(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Summary token (CLS) of the last block's output for each image (N×D), the model in eval mode."""
    vit = resolve_vit(model)
    was_training = vit.backbone.training
    vit.backbone.eval()
    features = [split_tokens(vit, vit.block_outputs(chunk)[-1])[0].float() for chunk in pixel_values.split(batch_size)]
    vit.backbone.train(was_training)
    return torch.cat(features)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    max_iterations: int = 200,
) -> float:
    """Top-1 test accuracy of a multinomial logistic regression fitted on standardised features."""
    mean, std = train_features.mean(0), train_features.std(0).clamp(min=1e-6)
    train, test = (train_features - mean) / std, (test_features - mean) / std
    head = nn.Linear(train.shape[1], int(train_labels.max()) + 1)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(train), train_labels) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (head(test).argmax(-1) == test_labels).float().mean().item()
