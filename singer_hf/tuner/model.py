"""`SingerModel`: injects SiNGER adapters around the distilled blocks of a ViT teacher."""

from __future__ import annotations

import re

import torch
from peft.tuners.tuners_utils import BaseTuner

from ..architectures import ARCHITECTURES, resolve_vit
from .config import SingerConfig
from .layer import SingerLayer, _random_unit_rows, basis_with_count


class SingerModel(BaseTuner):
    """PEFT tuner for SiNGER; build it with `peft.get_peft_model(teacher, SingerConfig(...))`.

    Block l of 𝓛 is wrapped in a `SingerLayer` whose basis comes from the MLP of block l + 1 (block
    l itself for the final layer), following SPEC §4. The wrapped teacher computes exactly what it
    computed before; `singer_layers` gives the adapters that refine its block outputs.
    """

    prefix: str = "singer_"
    tuner_layer_cls = SingerLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: SingerConfig, model_config: dict) -> SingerConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in ARCHITECTURES:
                raise ValueError(
                    f"model: unsupported model type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
                )
            blocks = re.escape(ARCHITECTURES[model_type].blocks)
            indices = "|".join(str(layer) for layer in peft_config.layers)
            peft_config.target_modules = rf"(.*\.)?{blocks}\.({indices})"
        return peft_config

    def _pre_injection_hook(self, model, config: SingerConfig, adapter_name: str) -> None:
        teacher = resolve_vit(model, "teacher")
        if config.layers[-1] >= teacher.depth:
            raise ValueError(
                f"layers: block index {config.layers[-1]} is out of range for a {teacher.depth}-block teacher "
                f"(valid: 0..{teacher.depth - 1})"
            )
        if config.rank > teacher.width:
            raise ValueError(f"rank: must be in [1, {teacher.width}] for a {teacher.width}-wide teacher, got {config.rank}")
        self._teacher = teacher

    def _create_and_replace(self, config: SingerConfig, adapter_name, target, target_name, parent, current_key, **kwargs):
        layer = int(target_name)
        is_final = layer == config.layers[-1]
        fc1, fc2 = self._teacher.mlp_weights(layer if is_final else layer + 1)
        generator = torch.Generator().manual_seed(config.seed + layer)
        if config.init == "nullspace":
            matrix = (fc2.detach().double() @ fc1.detach().double()).T  # M = (W_fc2 W_fc1)ᵀ, D×D
            basis, found = basis_with_count(matrix, config.rank, config.null_threshold, generator)
        else:
            basis, found = _random_unit_rows(config.rank, fc1.shape[1], generator).float(), 0
        if isinstance(target, SingerLayer):
            target.update_layer(adapter_name, basis, found)
            return
        new_module = SingerLayer(target, self._teacher.num_prefix_tokens)
        new_module.update_layer(adapter_name, basis, found)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @property
    def singer_layers(self) -> dict[int, SingerLayer]:
        """The adapter layers by teacher block index."""
        teacher = resolve_vit(self.model, "teacher")
        return {index: block for index, block in enumerate(teacher.blocks) if isinstance(block, SingerLayer)}
