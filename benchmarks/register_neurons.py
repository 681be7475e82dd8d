"""Plants high-norm artifact tokens in a trained ViT classifier through "register neurons".

Large ViTs trained long enough grow a few patch tokens, in low-information background, whose
norms are many times the rest and which carry image-level rather than local information (Darcet
et al., "Vision Transformers Need Registers", ICLR 2024). Jiang et al. ("Vision Transformers Don't
Need Trained Registers", 2025) trace them to a handful of MLP units in a middle block ("register
neurons") that fire on those patches and write one large vector into the residual stream; every
later block then reads that token through its LayerNorm, where the large vector dominates, so the
token's query becomes nearly constant and it attends globally, losing its local content.

The small Fashion-MNIST teachers this project can train on a CPU do not grow them (their patch-norm
max/median ratio stays about 1.3). This module builds the mechanism into one block's MLP of a
trained teacher, with two of its existing hidden units, so the model stays a plain HF ViT:

1. a linear read-out of the MLP's input (fc1's input, after the block's LayerNorm) is fitted by
   logistic regression to tell blank patches (every pixel below 5 % intensity) from the rest;
2. its threshold is set at the (1 − `share`) quantile of the read-out over the sample's patch tokens,
   so the units fire on the `share` most confidently blank patches (which ones varies by image);
3. two hidden units (the least used ones) get the read-out as fc1 rows, one shifted by a margin, and
   opposite fc2 columns along one random direction: GELU(z) − GELU(z − c) is a saturating step, so
   a firing token receives one fixed large vector (`ratio` × the block's median patch norm) and the
   others receive nothing;
4. the blocks after it (and the final norm and classifier) are then fine-tuned on the labels with the
   planted block and everything before it frozen, so the later blocks learn to read the new tokens.

The artifacts are in the weights, so they flow through a real forward pass of every later block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from singer_hf import resolve_vit

BLANK_INTENSITY = 0.05
"""A patch is blank (low-information) when all its pixels are below this intensity (0..1)."""
STEP_HEIGHT = 10.0
"""c: the units' saturating step GELU(z) − GELU(z − c) rises from 0 to c."""
RAMP_SHARE = 0.1
"""Share of the firing tokens that fall on the step's ramp (partial vector) rather than its top."""


def blank_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """B×H×W intensities in [0, 1] → B×P booleans (row-major patches): every pixel below BLANK_INTENSITY."""
    batch, height, width = images.shape
    patches = images.reshape(batch, height // patch_size, patch_size, width // patch_size, patch_size)
    return patches.amax(dim=(2, 4)).flatten(1) < BLANK_INTENSITY


def _fc_layers(vit, block: int) -> tuple[nn.Linear, nn.Linear]:
    module, (layout, *_) = vit.blocks[block], vit.architecture.mlps
    return module.get_submodule(layout.up), module.get_submodule(layout.down)


@torch.no_grad()
def _mlp_io(vit, block: int, pixel_values: torch.Tensor, batch_size: int = 500):
    """(fc1 inputs B×N×D, hidden activations B×N×H, block outputs B×N×D) of `block`."""
    fc1, fc2 = _fc_layers(vit, block)
    inputs, hidden, outputs = [], [], []
    hooks = [
        fc1.register_forward_pre_hook(lambda module, args: inputs.append(args[0])),
        fc2.register_forward_pre_hook(lambda module, args: hidden.append(args[0])),
    ]
    try:
        for chunk in pixel_values.split(batch_size):
            outputs.append(vit.block_outputs(chunk, last_block=block)[-1])
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(inputs), torch.cat(hidden), torch.cat(outputs)


def _fit_blank_readout(features: torch.Tensor, blank: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logistic regression (weights D, bias) of "blank patch" on fc1 inputs."""
    readout = nn.Linear(features.shape[1], 1)
    optimizer = torch.optim.LBFGS(readout.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    target = blank.float()

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(readout(features).squeeze(-1), target) + 1e-3 * readout.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return readout.weight.detach()[0], readout.bias.detach().item()


@torch.no_grad()
def plant_register_neurons(
    model: nn.Module,
    pixel_values: torch.Tensor,
    blank: torch.Tensor,
    block: int,
    share: float = 0.025,
    ratio: float = 8.0,
    seed: int = 0,
) -> dict:
    """Writes the two register units into `block`'s MLP of `model` (in place); returns what was done.

    `pixel_values` (B×3×H×W) and `blank` (B×P, see `blank_patches`) are a sample of training images
    the read-out and the threshold are fitted on.
    """
    vit = resolve_vit(model)
    prefix = vit.num_prefix_tokens
    inputs, hidden, outputs = _mlp_io(vit, block, pixel_values)
    patch_inputs = inputs[:, prefix:].flatten(0, 1)
    with torch.enable_grad():
        weight, bias = _fit_blank_readout(patch_inputs, blank.flatten())
    readout = patch_inputs @ weight + bias
    accuracy = ((readout > 0) == blank.flatten()).float().mean().item()
    # The step starts at the (1 − share) quantile of the read-out and is at full height from the
    # (1 − (1 − RAMP_SHARE)·share) quantile on: most firing tokens get the whole vector.
    threshold, full = torch.quantile(readout, torch.tensor([1 - share, 1 - (1 - RAMP_SHARE) * share])).tolist()
    slope = STEP_HEIGHT / max(full - threshold, 1e-6)

    fc1, fc2 = _fc_layers(vit, block)
    # The least used units: smallest mean |activation| × outgoing weight norm over the sample.
    usage = hidden.abs().flatten(0, 1).mean(0) * fc2.weight.norm(dim=0)
    on_unit, off_unit = usage.argsort()[:2].tolist()
    median_norm = outputs[:, prefix:].norm(dim=-1).median().item()
    generator = torch.Generator().manual_seed(seed)
    direction = F.normalize(torch.randn(fc2.out_features, generator=generator), dim=0)
    vector = direction * (ratio * median_norm / STEP_HEIGHT)
    # GELU(slope·(s − threshold)) − GELU(slope·(s − threshold) − c): 0 below the threshold, c above it.
    fc1.weight[on_unit] = slope * weight
    fc1.bias[on_unit] = slope * (bias - threshold)
    fc1.weight[off_unit] = slope * weight
    fc1.bias[off_unit] = slope * (bias - threshold) - STEP_HEIGHT
    fc2.weight[:, on_unit] = vector
    fc2.weight[:, off_unit] = -vector
    return {
        "block": block,
        "units": [on_unit, off_unit],
        "target_share": share,
        "written_norm": ratio * median_norm,
        "written_norm_over_median": ratio,
        "blank_readout_accuracy": accuracy,
        "blank_share_of_patches": blank.float().mean().item(),
        "images_fitted_on": int(pixel_values.shape[0]),
    }


def finetune_after(
    model: nn.Module,
    block: int,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 5e-4,
    seed: int = 0,
) -> list[float]:
    """Trains the blocks after `block`, the final norm and the classifier on the labels (cosine lr);
    `block` and everything before it stay frozen. Returns the loss every 50 steps."""
    vit = resolve_vit(model)
    model.requires_grad_(False)
    trainable = [*vit.blocks[block + 1 :], *[module for module in model.children() if module is not vit.backbone]]
    trainable.append(vit.backbone.get_submodule("layernorm"))
    for module in trainable:
        module.requires_grad_(True)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        batch = torch.randint(len(labels), (batch_size,), generator=generator)
        loss = model(pixel_values=pixel_values[batch], labels=labels[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(loss.item())
    model.eval().requires_grad_(True)
    return losses
