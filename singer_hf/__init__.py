"""SiNGER ViT feature distillation, Hugging Face native."""

from .architectures import ARCHITECTURES, resolve_vit
from .modeling import DistillationModel, DistillationModelConfig, DistillationOutput, map_layers
from .trainer import SingerTrainer, SingerTrainingArguments
from .tuner import SingerConfig, SingerLayer, SingerModel, nullspace_basis, nullspace_directions

__all__ = [
    "ARCHITECTURES",
    "DistillationModelConfig",
    "DistillationModel",
    "DistillationOutput",
    "SingerConfig",
    "SingerLayer",
    "SingerModel",
    "SingerTrainer",
    "SingerTrainingArguments",
    "map_layers",
    "nullspace_basis",
    "nullspace_directions",
    "resolve_vit",
]
