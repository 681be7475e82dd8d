"""Probe metrics against hand-computed values, the ImageNet-R mapping, parallel-lr heads, the feature
cache, and the paper's training augmentation (fresh per epoch, targets transformed with the image)."""

from __future__ import annotations

import math

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import IMAGE, make_vit

from singer_hf.evaluation import (
    IMAGENET_R_CLASSES,
    AugmentedFeatures,
    ClassificationProbe,
    DepthProbe,
    FeatureSet,
    cached_features,
    evaluate_heads,
    extract_features,
    imagenet_r_logit_indices,
    train_heads,
)
from singer_hf.evaluation.metrics import IGNORE_INDEX, DepthMetrics, mean_iou
from singer_hf.evaluation.probe_data import ProbeTransform, collate_probe_batch


def test_miou_is_dataset_level_from_one_confusion_matrix():
    # Two "batches" of 4 pixels, 3 classes, one ignored pixel.
    targets = [torch.tensor([[0, 0, 1, IGNORE_INDEX]]), torch.tensor([[1, 1, 2, 2]])]
    predictions = [torch.tensor([[0, 1, 1, 2]]), torch.tensor([[1, 1, 2, 0]])]
    metric = mean_iou(3)
    for prediction, target in zip(predictions, targets):
        metric.update(prediction, target)
    # Confusion over the 7 counted pixels: class 0: TP 1, FP 1, FN 1 → 1/3; class 1: TP 3, FP 1,
    # FN 0 → 3/4; class 2: TP 1, FP 0, FN 1 → 1/2.
    expected = (1 / 3 + 3 / 4 + 1 / 2) / 3
    assert metric.compute().item() == pytest.approx(expected)
    per_batch = []
    for prediction, target in zip(predictions, targets):
        batch_metric = mean_iou(3)
        batch_metric.update(prediction, target)
        per_batch.append(batch_metric.compute().item())
    assert sum(per_batch) / 2 != pytest.approx(expected)  # what the official code averaged


def test_depth_metrics_per_image_over_valid_pixels():
    depths = torch.tensor([[[1.0, 2.0], [0.0, 12.0]], [[4.0, 4.0], [4.0, 4.0]]])  # image 0: 2 valid pixels
    predictions = torch.tensor([[[2.0, 2.0], [5.0, 5.0]], [[4.0, 4.0], [4.0, 6.0]]])
    metrics = DepthMetrics(max_depth=10.0)
    metrics.update(predictions, depths)
    values = metrics.compute()
    # Image 0: valid pixels 1 m and 2 m (0 and 12 m are not), predicted 2 m and 2 m; image 1: all
    # four at 4 m, predicted 4, 4, 4 and 6 m.
    rmse = (math.sqrt((1 + 0) / 2) + math.sqrt(4 / 4)) / 2
    abs_rel = ((1 / 1 + 0) / 2 + (2 / 4) / 4) / 2
    delta1 = (50 + 75) / 2  # ratio 2 fails in image 0; ratio 1.5 ≥ 1.25 fails in image 1
    delta2 = (50 + 100) / 2  # 1.5 < 1.5625 passes, 2 ≥ 1.5625 fails
    delta3 = (50 + 100) / 2  # 2 ≥ 1.953 still fails
    assert values["rmse"] == pytest.approx(rmse)
    assert values["abs_rel"] == pytest.approx(abs_rel)
    assert values["delta1"] == pytest.approx(delta1)
    assert values["delta2"] == pytest.approx(delta2)
    assert values["delta3"] == pytest.approx(delta3)


def test_depth_probe_bins_and_soft_argmax():
    probe = DepthProbe(bins=11, max_depth=10.0, temperature=1.0)
    bins = probe.target_bins(torch.tensor([0.0, 0.4, 5.0, 9.96, 10.0, 12.0]))
    assert bins.tolist() == [-100, 0, 5, 10, -100, -100]  # 0 and ≥ max_depth are not valid depths
    logits = torch.full((11, 1, 1), -1e4)
    logits[3] = 0
    assert probe.predict(logits).item() == pytest.approx(3.0)  # one-hot bin 3 → its centre, 3 m


def test_imagenet_r_mapping_gathers_its_200_classes_in_its_label_order():
    wnids = [wnid for wnid, _ in IMAGENET_R_CLASSES]
    indices = imagenet_r_logit_indices()
    assert len(wnids) == len(set(wnids)) == 200 and wnids == sorted(wnids)
    assert indices.tolist() == sorted(set(indices.tolist())) and 0 <= indices.min() and indices.max() < 1000
    assert IMAGENET_R_CLASSES[0] == ("n01443537", 1) and IMAGENET_R_CLASSES[-1] == ("n12267677", 988)  # goldfish, acorn
    # A head whose logit for ImageNet class c is largest predicts ImageNet-R label k exactly when c = indices[k].
    logits = torch.zeros(200, 1000)
    logits[torch.arange(200), indices] = 1.0
    probe = ClassificationProbe(1000)
    evaluator = probe.evaluator(indices)
    evaluator.update(logits, torch.arange(200))
    assert evaluator.compute()["value"] == pytest.approx(100.0)
    evaluator = probe.evaluator(indices)
    evaluator.update(logits, torch.arange(200).roll(1))
    assert evaluator.compute()["value"] == 0.0


def blobs(count=120, classes=3, dim=8, seed=0) -> FeatureSet:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    centres = 2 * torch.randn(classes, dim, generator=generator)
    summary = centres[labels] + torch.randn(count, dim, generator=generator)
    return FeatureSet(summary, None, labels, (1, 1))


def test_parallel_heads_equal_heads_trained_one_at_a_time():
    features, probe = blobs(), ClassificationProbe(3)
    together = train_heads(probe, features, [0.05, 0.5], epochs=3, batch_size=16, seed=1)
    for index, lr in enumerate([0.05, 0.5]):
        alone = train_heads(probe, features, [lr], epochs=3, batch_size=16, seed=1)
        torch.testing.assert_close(together.weights[index], alone.weights[0], rtol=0, atol=0)
        torch.testing.assert_close(together.biases[index], alone.biases[0], rtol=0, atol=0)
    assert not torch.equal(together.weights[0], together.weights[1])
    scores = evaluate_heads(probe, together, features, batch_size=50)
    assert scores[1]["value"] > 90  # separable blobs


def test_disk_cached_features_give_the_same_head_as_fresh_ones(tmp_path):
    model = make_vit(hidden=32, layers=2)
    pixel_values = torch.randn(15, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    examples = [{"pixel_values": image, "targets": index % 2} for index, image in enumerate(pixel_values)]
    loader = torch.utils.data.DataLoader(examples, batch_size=5, collate_fn=collate_probe_batch)
    calls = []

    def extract():
        calls.append(1)
        return extract_features(model, loader, keep_patches=True)

    key = {"backbone": "tiny", "split": "train"}
    fresh = cached_features(None, key, extract)
    written = cached_features(tmp_path, key, extract)
    reread = cached_features(tmp_path, key, lambda: pytest.fail("a complete cache must not be re-extracted"))
    assert len(calls) == 2 and len(reread) == 15 and reread.grid == (4, 4)
    for name, tensor in fresh.tensors().items():
        torch.testing.assert_close(reread.tensors()[name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(written.tensors()[name], tensor, rtol=0, atol=0)
    probe = ClassificationProbe(2)
    heads = [train_heads(probe, features, [0.1], epochs=2, batch_size=4) for features in (fresh, reread)]
    torch.testing.assert_close(heads[0].weights[0], heads[1].weights[0], rtol=0, atol=0)
    # The features are the last block's output before the final norm, CLS first.
    with torch.no_grad():
        expected = model(pixel_values=pixel_values[:5], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(fresh.summary[:5], expected[:, 0])
    torch.testing.assert_close(fresh.patches[:5], expected[:, 1:])


def _half_bright_image(height: int = 40, width: int = 48) -> np.ndarray:
    """Dark left half, bright right half: brightness tells which half a pixel came from."""
    image = np.full((height, width, 3), 10, np.uint8)
    image[:, width // 2 :] = 230
    return image


def test_augmented_training_features_change_every_epoch_and_plain_ones_do_not():
    model = make_vit(hidden=32, layers=2)
    images = [PIL.Image.fromarray(np.roll(_half_bright_image(), 7 * k, axis=1)) for k in range(6)]
    dataset = datasets.Dataset.from_dict({"image": images, "label": [k % 2 for k in range(6)]})
    torch.manual_seed(0)  # torchvision's random transforms draw from torch's global generator

    def extractor(augmentation: str):
        transform = ProbeTransform("image-classification", [0.5] * 3, [0.5] * 3, IMAGE, "image", "label", augmentation=augmentation)
        seen = []

        def extract(indices: torch.Tensor, epoch: int) -> FeatureSet:
            subset = dataset.select(indices.tolist()).with_transform(transform)
            loader = torch.utils.data.DataLoader(subset, batch_size=4, collate_fn=collate_probe_batch)
            seen.append(extract_features(model, loader, keep_patches=False))
            return seen[-1]

        return extract, seen

    probe = ClassificationProbe(2)
    extract, fed = extractor("paper")
    train_heads(probe, AugmentedFeatures(extract, torch.arange(6)), [0.1], epochs=2, batch_size=4)
    assert len(fed) == 2  # one backbone pass over the training images per epoch
    torch.testing.assert_close(fed[0].targets, fed[1].targets, rtol=0, atol=0)
    assert all(not torch.allclose(a, b) for a, b in zip(fed[0].summary, fed[1].summary))  # every example re-augmented
    extract, fed = extractor("none")
    plain = extract(torch.arange(6), 0)
    assert plain.for_epoch(1) is plain  # without augmentation the heads see the same features every epoch
    torch.testing.assert_close(extract(torch.arange(6), 1).summary, plain.summary, rtol=0, atol=0)


@pytest.mark.parametrize("task", ["image-segmentation", "depth-estimation"])
def test_paper_augmentation_moves_masks_and_depth_maps_with_the_image(task):
    image = _half_bright_image()
    target = np.where(image[..., 0] > 100, 2, 1).astype(np.uint8 if task == "image-segmentation" else np.float32)
    transform = ProbeTransform(task, [0.0] * 3, [1.0] * 3, IMAGE, "image", "target", augmentation="paper")
    torch.manual_seed(0)
    crops = []
    for _ in range(8):
        out = transform({"image": [PIL.Image.fromarray(image)], "target": [target]})
        pixels, dense = out["pixel_values"][0], out["targets"][0]
        assert pixels.shape == (3, IMAGE, IMAGE) and dense.shape == (IMAGE, IMAGE)
        assert set(dense.unique().tolist()) <= {1, 2}  # nearest: no blended labels or depths
        bright = pixels.mean(0) > 0.5
        assert (bright == (dense == 2)).float().mean() > 0.95  # the target followed the image's crop and flip
        crops.append(dense)
    assert any(not torch.equal(crops[0], crop) for crop in crops[1:])  # a fresh random crop per call
