"""The paper's linear probes (docs/method.md §8) on cached features, several learning rates at once.

Every probe is linear heads trained with SGD (momentum 0.9 — the official code never passes it,
docs/method.md §7), weight decay 1e-6 and a per-step cosine schedule, on a `FeatureSet`:

- `ClassificationProbe`: a linear layer on the CLS token.
- `SegmentationProbe`: a 1×1 conv on the patch grid, bilinear up-sampling to the label size,
  cross-entropy ignoring `IGNORE_INDEX`, dataset-level mIoU.
- `DepthProbe`: each patch token concatenated with CLS, 1×1 conv to depth bins over
  [0, max_depth], bilinear up-sampling, cross-entropy on the binned depth, soft-argmax prediction.

The paper up-samples the features and then applies the 1×1 conv; both are linear and bilinear
weights sum to one, so the conv is applied first here, on 16² times fewer positions, with the
same result.

`--learning_rates` with several values trains one head per rate in the same pass over the same
batches (`ParallelLinear`); `fit_probe` picks one on a held-out part of the training split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .features import AugmentedFeatures, FeatureSet
from .metrics import IGNORE_INDEX, DepthMetrics, mean_iou, top1_accuracy

MOMENTUM, WEIGHT_DECAY = 0.9, 1e-6


class ParallelLinear(nn.Module):
    """H independent linear maps D→C on the same input, one per learning rate, identically
    initialised (weights N(0, 0.01²), zero bias), so head h is the head a run with only
    learning rate h would train."""

    def __init__(self, num_heads: int, in_features: int, out_features: int, generator: torch.Generator):
        super().__init__()
        weight = 0.01 * torch.randn(out_features, in_features, generator=generator)
        self.weights = nn.ParameterList([nn.Parameter(weight.clone()) for _ in range(num_heads)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(out_features)) for _ in range(num_heads)])

    def __len__(self) -> int:
        return len(self.weights)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """…×D → H×…×C."""
        return torch.stack([F.linear(inputs, weight, bias) for weight, bias in zip(self.weights, self.biases)])


class ClassificationProbe:
    task = "image-classification"
    metric, higher_is_better = "accuracy", True

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.head = f"linear layer on the CLS token → {num_classes} classes"

    def in_features(self, features: FeatureSet) -> int:
        return features.summary.shape[-1]

    @property
    def out_features(self) -> int:
        return self.num_classes

    def inputs(self, features: FeatureSet) -> torch.Tensor:
        return features.summary.float()

    def outputs(self, heads: ParallelLinear, features: FeatureSet) -> torch.Tensor:
        return heads(self.inputs(features))  # H×B×C

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(output, targets) for output in outputs)

    def evaluator(self, logit_indices: torch.Tensor | None = None):
        classes = self.num_classes if logit_indices is None else len(logit_indices)
        return _Evaluator(top1_accuracy(classes), logit_indices)


class SegmentationProbe(ClassificationProbe):
    task = "image-segmentation"
    metric, higher_is_better = "mean_iou", True

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.head = f"1×1 conv on the patch grid → {num_classes} classes, bilinear up-sampling to the label size"

    def in_features(self, features: FeatureSet) -> int:
        return features.patches.shape[-1]

    def inputs(self, features: FeatureSet) -> torch.Tensor:
        return features.patches.float()

    def outputs(self, heads: ParallelLinear, features: FeatureSet) -> torch.Tensor:
        return _dense_logits(heads(self.inputs(features)), features.grid, features.targets.shape[-2:])

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(output, targets.long(), ignore_index=IGNORE_INDEX) for output in outputs)

    def evaluator(self, logit_indices: torch.Tensor | None = None):
        return _Evaluator(mean_iou(self.num_classes))


class DepthProbe(SegmentationProbe):
    task = "depth-estimation"
    metric, higher_is_better = "rmse", False

    def __init__(self, bins: int = 256, max_depth: float = 10.0, temperature: float = 0.03):
        self.bins, self.max_depth, self.temperature = bins, max_depth, temperature
        self.head = (
            f"patch token ⊕ CLS, 1×1 conv → {bins} depth bins over [0, {max_depth:g}] m, bilinear up-sampling, "
            f"soft-argmax with temperature {temperature:g}"
        )

    def in_features(self, features: FeatureSet) -> int:
        return 2 * features.patches.shape[-1]

    @property
    def out_features(self) -> int:
        return self.bins

    def inputs(self, features: FeatureSet) -> torch.Tensor:
        patches = features.patches.float()
        summary = features.summary.float()[:, None].expand_as(patches)
        return torch.cat([patches, summary], dim=-1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bins = self.target_bins(targets)
        return sum(F.cross_entropy(output, bins, ignore_index=-100) for output in outputs)

    def target_bins(self, depths: torch.Tensor) -> torch.Tensor:
        """Depth/max_depth clamped to [0, 1] and rounded to the nearest of `bins` bin centres
        (0, 1/(bins−1), …, 1); pixels without valid depth (not in (0, max_depth)) are ignored."""
        bins = (depths / self.max_depth).clamp(0, 1).mul(self.bins - 1).round().long()
        valid = (depths > 0) & (depths < self.max_depth)
        return torch.where(valid, bins, torch.full_like(bins, -100))

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft-argmax: the expected bin centre under softmax(logits / temperature), in metres."""
        centres = torch.linspace(0, self.max_depth, self.bins, device=logits.device)
        weights = torch.softmax(logits / self.temperature, dim=-3)
        return torch.einsum("...khw,k->...hw", weights, centres)

    def evaluator(self, logit_indices: torch.Tensor | None = None):
        return _DepthEvaluator(self)



def _dense_logits(outputs: torch.Tensor, grid: tuple[int, int], size) -> torch.Tensor:
    """H×B×P×C patch logits → H×B×C×height×width, bilinearly up-sampled to the label size."""
    heads, batch, _, channels = outputs.shape
    maps = outputs.reshape(heads * batch, *grid, channels).permute(0, 3, 1, 2)
    maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps.reshape(heads, batch, channels, *size)


class _Evaluator:
    def __init__(self, metric, logit_indices: torch.Tensor | None = None):
        self.metric, self.logit_indices = metric, logit_indices

    def to(self, device):
        self.metric = self.metric.to(device)
        return self

    def update(self, output: torch.Tensor, targets: torch.Tensor) -> None:
        if self.logit_indices is not None:
            output = output.index_select(-1, self.logit_indices.to(output.device))
        self.metric.update(output.argmax(1 if output.ndim > 2 else -1), targets.long())

    def compute(self) -> dict[str, float]:
        return {"value": 100 * self.metric.compute().item()}


class _DepthEvaluator:
    def __init__(self, probe: DepthProbe):
        self.probe, self.metrics = probe, DepthMetrics(probe.max_depth)

    def to(self, device):
        self.metrics = self.metrics.to(device)
        return self

    def update(self, output: torch.Tensor, targets: torch.Tensor) -> None:
        self.metrics.update(self.probe.predict(output), targets.float())

    def compute(self) -> dict[str, float]:
        return self.metrics.compute()


def _batches(features: FeatureSet, order: torch.Tensor, batch_size: int, device):
    for indices in order.split(batch_size):
        batch = features.select(indices)
        yield FeatureSet(
            batch.summary.to(device),
            None if batch.patches is None else batch.patches.to(device),
            batch.targets.to(device),
            batch.grid,
        )


def train_heads(
    probe,
    features: FeatureSet | AugmentedFeatures,
    learning_rates: list[float],
    epochs: int,
    batch_size: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ParallelLinear:
    """One head per learning rate, trained on the same shuffled batches (seeded), on
    `features.for_epoch(epoch)`: the same features every epoch, or freshly augmented ones."""
    generator = torch.Generator().manual_seed(seed)
    epoch_features = features.for_epoch(0)
    heads = ParallelLinear(len(learning_rates), probe.in_features(epoch_features), probe.out_features, generator).to(device)
    groups = [
        {"params": [weight, bias], "lr": lr} for weight, bias, lr in zip(heads.weights, heads.biases, learning_rates)
    ]
    optimizer = torch.optim.SGD(groups, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    total_steps = epochs * math.ceil(len(features) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    heads.train()
    for epoch in tqdm(range(epochs), desc=f"probe heads ({len(learning_rates)})", disable=not progress):
        if epoch > 0:
            epoch_features = features.for_epoch(epoch)
        order = torch.randperm(len(epoch_features), generator=generator)
        for batch in _batches(epoch_features, order, batch_size, device):
            loss = probe.loss(probe.outputs(heads, batch), batch.targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return heads.eval()


@torch.no_grad()
def evaluate_heads(
    probe, heads: ParallelLinear, features: FeatureSet, batch_size: int, logit_indices: torch.Tensor | None = None
) -> list[dict[str, float]]:
    """Each head's metrics on `features`; `logit_indices` keeps only those logits, in that order
    (ImageNet-R's 200 of the 1000 ImageNet classes)."""
    device = heads.weights[0].device
    evaluators = [probe.evaluator(logit_indices).to(device) for _ in range(len(heads))]
    for batch in _batches(features, torch.arange(len(features)), batch_size, device):
        for evaluator, output in zip(evaluators, probe.outputs(heads, batch)):
            evaluator.update(output, batch.targets)
    return [evaluator.compute() for evaluator in evaluators]


@dataclass
class FittedProbe:
    heads: ParallelLinear
    learning_rates: list[float]
    selected: int
    """Index of the head that is reported."""
    selection_rule: str
    held_out_scores: dict[str, float] = field(default_factory=dict)
    num_train_examples: int = 0

    @property
    def learning_rate(self) -> float:
        return self.learning_rates[self.selected]


def primary_value(probe, metrics: dict[str, float]) -> float:
    return metrics["value" if "value" in metrics else probe.metric]


def fit_probe(
    probe,
    features: FeatureSet,
    learning_rates: list[float],
    epochs: int,
    batch_size: int,
    seed: int = 0,
    held_out_fraction: float = 0.1,
    device: str | torch.device = "cpu",
    progress: bool = False,
    augmented: AugmentedFeatures | None = None,
) -> FittedProbe:
    """The paper's protocol with one learning rate (the last epoch's head, all training data);
    with several, heads are trained on all but a seeded `held_out_fraction` of the training
    split and the best on that held-out part is kept — the test split never selects anything.

    `augmented` (the same training split, freshly augmented each epoch) replaces `features` for
    training; the held-out part is still scored on `features`, the un-augmented images."""
    training = features if augmented is None else augmented
    if len(learning_rates) == 1:
        heads = train_heads(probe, training, learning_rates, epochs, batch_size, seed, device, progress)
        return FittedProbe(heads, list(learning_rates), 0, "single learning rate; head after the last epoch", {}, len(features))
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    held_out_count = max(1, round(held_out_fraction * len(features)))
    held_out, train = features.select(order[:held_out_count]), training.select(order[held_out_count:])
    heads = train_heads(probe, train, learning_rates, epochs, batch_size, seed, device, progress)
    scores = [primary_value(probe, metrics) for metrics in evaluate_heads(probe, heads, held_out, batch_size)]
    pick = max if probe.higher_is_better else min
    selected = scores.index(pick(scores))
    rule = (
        f"{'highest' if probe.higher_is_better else 'lowest'} {probe.metric} on a held-out {held_out_fraction:g} of the "
        f"training split ({held_out_count} examples, seed {seed}); heads trained on the other {len(train)}"
    )
    return FittedProbe(heads, list(learning_rates), selected, rule, {f"{lr:g}": s for lr, s in zip(learning_rates, scores)}, len(train))
