"""PHI-S: balancing teachers whose features live at different scales (Ranzinger et al., 2024).

With several teachers, the KD loss of the teacher whose features have the largest norm dominates
the sum (the same failure SiNGER fixes inside one teacher, between tokens). PHI-S ("PCA-Hadamard
isotropic standardisation") maps each teacher's features to a space where every dimension has unit
variance, by a rotation and one scale:

    y = Q (x − μ) / α,   Q = R Uᵀ,   α = sqrt(mean eigenvalue of Cov(x))

with Cov(x) = U Λ Uᵀ and R an orthogonal matrix whose rows spread every principal direction evenly
over the dimensions (R Λ Rᵀ has a constant diagonal): a normalised Hadamard matrix where one exists
(the width a power of two), else the same property built by Givens rotations. Being a rotation and
one scale, it keeps the geometry of the features (MSE in y is MSE in x divided by α²), unlike
per-dimension standardisation, which would stretch some directions and shrink others. Statistics are
estimated once, before training, on the teacher's own (unrefined) features; the inverse maps a
student head's output back to the teacher's space.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from scipy.linalg import hadamard
from torch import nn

class FeatureMoments:
    """Running first and second moments of token features (float64), to fit `TargetNormalization`."""

    def __init__(self, width: int):
        self.count = 0
        self.total = torch.zeros(width, dtype=torch.float64)
        self.outer = torch.zeros(width, width, dtype=torch.float64)

    def update(self, tokens: torch.Tensor) -> None:
        """Adds tokens (... × width)."""
        flat = tokens.detach().reshape(-1, tokens.shape[-1]).to(device="cpu", dtype=torch.float64)
        self.count += flat.shape[0]
        self.total += flat.sum(0)
        self.outer += flat.T @ flat

    def reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replaces the moments by their sum over processes (`reduce_sum`: a sum across ranks, e.g.
        `accelerator.reduce(tensor, "sum")`), so every process fits the same statistics."""
        width = self.total.numel()
        packed = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.total, self.outer.flatten()])
        summed = reduce_sum(packed).to(device="cpu", dtype=torch.float64)
        self.count, self.total, self.outer = int(summed[0].item()), summed[1 : 1 + width], summed[1 + width :].reshape(width, width)

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count < 2:
            raise ValueError("target normalisation: at least two tokens are needed to estimate the statistics")
        mean = self.total / self.count
        covariance = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, (covariance + covariance.T) / 2


def balancing_rotation(eigenvalues: torch.Tensor) -> torch.Tensor:
    """An orthogonal R (C×C) with diag(R diag(λ) Rᵀ) = mean(λ): a normalised Hadamard matrix when C is
    a power of two, else a sequence of Givens rotations, each setting one diagonal entry to the mean."""
    width = eigenvalues.numel()
    if width & (width - 1) == 0:
        return torch.from_numpy(hadamard(width)).to(torch.float64) / math.sqrt(width)
    values = eigenvalues.to(torch.float64)
    target = values.mean()
    matrix, rotation = torch.diag(values), torch.eye(width, dtype=torch.float64)
    tolerance = 1e-12 * max(float(values.abs().max()), 1.0)
    for _ in range(width - 1):
        diagonal = torch.diagonal(matrix)
        i, j = int(diagonal.argmax()), int(diagonal.argmin())
        a, b, d = matrix[i, i], matrix[i, j], matrix[j, j]
        if a - target <= tolerance:
            break
        # (a + 2bt + dt²) / (1 + t²) = target, t = tan θ: one root of (d − m)t² + 2bt + (a − m) = 0.
        t = (-b - torch.sqrt(b * b - (d - target) * (a - target))) / (d - target)
        c = 1 / torch.sqrt(1 + t * t)
        s = t * c
        givens = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
        rows = [i, j]
        matrix[rows, :] = givens @ matrix[rows, :]
        matrix[:, rows] = matrix[:, rows] @ givens.T
        rotation[rows, :] = givens @ rotation[rows, :]
    return rotation


class TargetNormalization(nn.Module):
    """y = Q (x − μ) / α on the last dimension (PHI-S, see the module docstring); the identity until `fit`.

    The buffers are part of the model's state (checkpoints carry them) and are saved beside the
    student's heads, so a head's output maps back to the teacher's space with `inverse`. `tokens`
    counts the tokens the statistics were estimated from (0: not fitted yet, the identity).
    """

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("rotation", torch.eye(width))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("tokens", torch.zeros((), dtype=torch.int64))

    @property
    def fitted(self) -> bool:
        return bool(self.tokens > 0)

    @torch.no_grad()
    def fit(self, moments: FeatureMoments) -> None:
        mean, covariance = moments.mean_and_covariance()
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        rotation = balancing_rotation(eigenvalues.clamp(min=0)) @ eigenvectors.T
        self.mean.copy_(mean.to(self.mean))
        self.rotation.copy_(rotation.to(self.rotation))
        self.scale.copy_(torch.sqrt(eigenvalues.clamp(min=0).mean()).clamp(min=1e-12).to(self.scale))
        self.tokens.fill_(moments.count)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features.to(self.rotation.dtype) - self.mean) @ self.rotation.T / self.scale

    def inverse(self, normalized: torch.Tensor) -> torch.Tensor:
        return normalized.to(self.rotation.dtype) * self.scale @ self.rotation + self.mean
