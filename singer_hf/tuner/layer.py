"""The SiNGER adapter layer and its nullspace initialisation."""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..architectures import MLPWeights


def _random_unit_rows(count: int, dim: int, generator: torch.Generator | None) -> torch.Tensor:
    rows = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True)


def nullspace_directions(matrix: torch.Tensor, threshold: float, relative: bool = False) -> torch.Tensor:
    """Left singular vectors uᵢᵀ of a D×K `matrix` with σᵢ < `threshold` (σᵢ < `threshold`·σ_max when
    `relative`), in descending-σ order (float64). For K < D the D − K directions beyond the matrix's
    rank have σ = 0.

    For M = (W_fc2 W_fc1)ᵀ these are the token directions x with x·M ≈ 0: what the next block's
    MLP (linearised) does not see.
    """
    u, sigma, _ = torch.linalg.svd(matrix.detach().to(torch.float64).cpu())
    sigma = torch.nn.functional.pad(sigma, (0, u.shape[1] - len(sigma)))
    limit = threshold * sigma[0] if relative else threshold
    return u[:, sigma < limit].T


def nullspace_basis(
    matrix: torch.Tensor, rank: int, threshold: float, generator: torch.Generator | None = None, relative: bool = False
) -> torch.Tensor:
    """The r×D basis N of SiNGER's adapter for a D×K matrix M (float64 SVD, returned as float32).

    The first min(r, |K|) rows are nullspace directions (`nullspace_directions`); the rest are
    random unit-norm rows drawn from `generator`, with a warning when none were found.
    """
    return basis_with_count(matrix, rank, threshold, generator, relative)[0]


def check_rank(rank: int, width: int) -> None:
    """A basis has at most as many rows as the teacher is wide."""
    if not 1 <= rank <= width:
        raise ValueError(f"rank: must be in [1, {width}] for a {width}-wide teacher, got {rank}")


def basis_with_count(
    matrix: torch.Tensor, rank: int, threshold: float, generator: torch.Generator | None = None, relative: bool = False
) -> tuple[torch.Tensor, int]:
    """`nullspace_basis` and how many of its rows are nullspace directions (one SVD)."""
    if matrix.ndim != 2:
        raise ValueError(f"matrix: must be D×K, got shape {tuple(matrix.shape)}")
    check_rank(rank, matrix.shape[0])
    directions = nullspace_directions(matrix, threshold, relative)[:rank]
    if len(directions) == 0:
        rule = f"{threshold}·σ_max" if relative else f"null_threshold={threshold}"
        warnings.warn(f"no singular value below {rule}; the adapter starts from {rank} random directions", stacklevel=3)
    padding = _random_unit_rows(rank - len(directions), matrix.shape[0], generator)
    return torch.cat([directions, padding]).to(torch.float32), len(directions)


def nullspace_matrix(mlp: MLPWeights) -> torch.Tensor:
    """M (D×D, float64) whose approximate left nullspace starts the adapter, from a block's MLP weights.

    Plain MLP `fc2(act(fc1(x)))`: M = (W_fc2 W_fc1)ᵀ, the bias-, activation- and norm-free
    linearisation x ↦ x·M. Gated MLP `down(act(gate(x)) ⊙ up(x))`: the value path M = (W_down W_up)ᵀ,
    the gate's activation taken as a constant, so its overall scale is arbitrary and its directions are
    kept by the relative rule σ < τ·σ_max. The pre-MLP norm's weight and LayerScale are not folded in
    (docs/gated_mlp.md has the measurements that chose all three).
    """
    return (mlp.down.detach().double() @ mlp.up.detach().double()).T


class SingerLayer(nn.Module, BaseTunerLayer):
    """Wraps one teacher block; owns that block's adapters (W_d: D×r, W_u: r×D per adapter name).

    `forward` is the block's own forward, unchanged. `refine(F)` applies the active adapters (or the
    named ones) to the patch tokens of the block's output F; prefix tokens (CLS, registers) are
    returned as they are.

    Merging: the adapters never enter the teacher's forward pass, so there is nothing to add to its
    weights. `merge` records the adapters as merged (PEFT's bookkeeping) and changes no weight, and
    `merge_and_unload()` returns the plain teacher, which computes exactly what the adapted teacher's
    forward computed; the refined features exist only through `refine`.
    """

    adapter_layer_names = ("singer_down", "singer_up")
    other_param_names = ("nullspace_row_count",)  # per-adapter state besides the weights (deleted with the adapter)

    def __init__(self, base_layer: nn.Module, num_prefix_tokens: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_prefix_tokens = num_prefix_tokens
        self.singer_down = nn.ParameterDict({})
        self.singer_up = nn.ParameterDict({})
        self.nullspace_row_count: dict[str, int] = {}
        """How many basis rows of each adapter came from the nullspace (the rest are random)."""
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, basis: torch.Tensor, nullspace_row_count: int) -> None:
        weight = self.get_base_layer().parameters().__next__()
        basis = basis.to(device=weight.device)
        self.singer_down[adapter_name] = nn.Parameter(basis.T.contiguous())
        self.singer_up[adapter_name] = nn.Parameter(basis.clone())
        self.nullspace_row_count[adapter_name] = nullspace_row_count
        self.set_adapter(self.active_adapters)

    def forward(self, *args, **kwargs):
        return self.base_layer(*args, **kwargs)

    def refine(self, features: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """F̂ = concat(prefix, X + Σ (X W_d) W_u) with X the patch tokens of `features` (B×N×D), summed
        over `adapter_names` (default: the active adapters; unknown names raise)."""
        if self.disable_adapters:
            return features
        if adapter_names is None:
            adapter_names = [name for name in self.active_adapters if name in self.singer_down]
        elif unknown := [name for name in adapter_names if name not in self.singer_down]:
            raise ValueError(f"adapter_names: {unknown} are not adapters of this layer ({sorted(self.singer_down)})")
        prefix, patches = features.split([self.num_prefix_tokens, features.shape[1] - self.num_prefix_tokens], 1)
        refined = patches
        for name in adapter_names:
            down, up = self.singer_down[name], self.singer_up[name]
            refined = refined + (patches @ down.to(patches.dtype)) @ up.to(patches.dtype)
        return torch.cat([prefix, refined], dim=1)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Marks the adapters merged; no weight changes (see the class docstring). `safe_merge` has no
        merged weight to check."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.singer_down:
                raise ValueError(f"adapter_names: {name!r} is not an adapter of this layer ({sorted(self.singer_down)})")
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        self.merged_adapters.clear()
