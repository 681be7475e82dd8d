"""SiNGER ViT feature distillation, Hugging Face native."""

from .architectures import ARCHITECTURES, resolve_vit
from .modeling import DistillationModel, DistillationModelConfig, DistillationOutput, TeacherSettings, map_layers
from .trainer import FeatureDistillationArguments, FeatureDistillationTrainer
from .tuner import SingerConfig, SingerLayer, SingerModel, nullspace_basis, nullspace_directions

__all__ = [
    "ARCHITECTURES",
    "DistillationModelConfig",
    "DistillationModel",
    "DistillationOutput",
    "FeatureDistillationArguments",
    "FeatureDistillationTrainer",
    "SingerConfig",
    "TeacherSettings",
    "SingerLayer",
    "SingerModel",
    "map_layers",
    "nullspace_basis",
    "nullspace_directions",
    "resolve_vit",
]
