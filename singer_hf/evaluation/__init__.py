"""Linear-probe evaluation on the frozen last block output, before the final norm (docs/method.md §8).

`features` extracts and caches, `probes` trains and scores the heads, `metrics` holds the
torchmetrics-based metrics, `probe_data` turns datasets into images and targets; scripts/evaluate.py
puts them together.
"""

from .features import AugmentedFeatures, FeatureSet, cached_features, extract_features, load_features, save_features
from .imagenet_r import IMAGENET_R_CLASSES, imagenet_r_logit_indices
from .probes import (
    ClassificationProbe,
    DepthProbe,
    FittedProbe,
    ParallelLinear,
    SegmentationProbe,
    evaluate_heads,
    fit_probe,
    train_heads,
)

__all__ = [
    "AugmentedFeatures",
    "IMAGENET_R_CLASSES",
    "ClassificationProbe",
    "DepthProbe",
    "FeatureSet",
    "FittedProbe",
    "ParallelLinear",
    "SegmentationProbe",
    "cached_features",
    "evaluate_heads",
    "extract_features",
    "fit_probe",
    "imagenet_r_logit_indices",
    "load_features",
    "save_features",
    "train_heads",
]
