"""`SingerModel`: injects SiNGER adapters around the distilled blocks of a ViT teacher."""

from __future__ import annotations

import re

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from ..architectures import ResolvedViT, resolve_vit
from .config import SingerConfig
from .layer import SingerLayer, _random_unit_rows, basis_with_count, check_rank, nullspace_matrix


class SingerModel(BaseTuner):
    """PEFT tuner for SiNGER; build it with `peft.get_peft_model(teacher, SingerConfig(...))`.

    Block l of 𝓛 is wrapped in a `SingerLayer` whose basis comes from the MLP of block l + 1 (block
    l itself for the final layer), as docs/method.md describes. The wrapped teacher computes exactly what it
    computed before; `singer_layers` gives the adapters that refine its block outputs.

    The PEFT lifecycle works as for any method: several named adapters (`add_adapter`,
    `set_adapter`, `delete_adapter`), `disable_adapter()`, `unload`, and `merge_adapter` /
    `merge_and_unload`, which change no weight: the adapters never enter the teacher's forward pass
    (see `SingerLayer`), so the unloaded teacher computes exactly what the adapted one did.
    """

    prefix: str = "singer_"
    tuner_layer_cls = SingerLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: SingerConfig, model_config: dict) -> SingerConfig:
        return peft_config  # target_modules needs the model itself: see _prepare_model

    def _prepare_model(self, peft_config: SingerConfig, model: nn.Module) -> None:
        """Bind the teacher to the architecture table and select exactly the blocks in `layers`.

        `target_modules` is derived from the blocks found in the model (a CLIP model's text tower has
        blocks of the same name); one given by the user or a saved config must select those same blocks.
        """
        if any(parameter.is_meta for parameter in model.parameters()):
            raise ValueError(
                "teacher: its weights are on the meta device (built without weights); the nullspace is computed from "
                "them: load the teacher with from_pretrained (or materialise it) before adding SiNGER adapters"
            )
        teacher = resolve_vit(model, "teacher")
        teacher.check_blocks(peft_config.layers, "layers")
        check_rank(peft_config.rank, teacher.width)
        wanted = {id(teacher.blocks[layer]) for layer in peft_config.layers}
        names = sorted((name for name, module in model.named_modules() if id(module) in wanted), key=_block_index)
        if peft_config.target_modules is None:
            parent = names[0].rpartition(".")[0]
            indices = "|".join(name.rpartition(".")[2] for name in names)
            peft_config.target_modules = rf"(.*\.)?{re.escape(parent)}\.({indices})"
        selected = sorted((name for name, _ in model.named_modules() if check_target_module_exists(peft_config, name)), key=_block_index)
        if selected != names:
            raise ValueError(
                f"target_modules: {peft_config.target_modules!r} selects {selected[:4] or 'no module'}, not the teacher "
                f"blocks {peft_config.layers} named by `layers` ({names}); SiNGER adapts whole blocks: leave target_modules unset"
            )
        check_basis_blocks(teacher, peft_config.layers)
        self._teacher = teacher

    def _create_and_replace(self, config: SingerConfig, adapter_name, target, target_name, parent, current_key, **kwargs):
        layer = int(target_name)
        mlp = self._teacher.mlp(basis_block(layer, config.layers))
        generator = torch.Generator().manual_seed(config.adapter_seed + layer)
        if config.adapter_init == "nullspace":
            # A gated MLP's value path has an arbitrary scale (its gate taken as 1): only σ < τ·σ_max means anything.
            basis, found = basis_with_count(nullspace_matrix(mlp), config.rank, config.null_threshold, generator, relative=mlp.gated)
        else:
            basis, found = _random_unit_rows(config.rank, self._teacher.width, generator).float(), 0
        if isinstance(target, SingerLayer):
            target.update_layer(adapter_name, basis, found)
            return
        new_module = SingerLayer(target, self._teacher.num_prefix_tokens)
        new_module.update_layer(adapter_name, basis, found)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # The tuner wraps whole blocks, not leaf layers: PEFT's version would copy a `weight` that
        # blocks do not have. The adapter's weights are created on the block's device.
        setattr(parent, child_name, new_module)

    @property
    def singer_layers(self) -> dict[int, SingerLayer]:
        """The adapter layers by teacher block index."""
        teacher = resolve_vit(self.model, "teacher")
        return {index: block for index, block in enumerate(teacher.blocks) if isinstance(block, SingerLayer)}


def basis_block(layer: int, layers: list[int]) -> int:
    """The block whose MLP gives layer `layer`'s nullspace: the next block, or its own for the final layer (docs/method.md §4)."""
    return layer if layer == layers[-1] else layer + 1


def check_basis_blocks(teacher: ResolvedViT, layers: list[int]) -> None:
    """One-line error unless every basis block has an MLP the nullspace can be read from (weights not needed)."""
    for layer in layers:
        teacher.mlp(basis_block(layer, layers))


def _block_index(name: str) -> tuple[str, int]:
    parent, _, index = name.rpartition(".")
    return parent, int(index) if index.isdigit() else -1
