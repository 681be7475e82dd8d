"""The evidence study's artifact teacher (benchmarks/register_neurons.py): planted register neurons
write high-norm tokens on a few blank patches through a real forward pass of a plain HF ViT."""

import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from register_neurons import blank_patches, finetune_after, plant_register_neurons  # noqa: E402

from singer_hf import resolve_vit  # noqa: E402

SIZE, PATCH, BLOCK = 32, 4, 1


def _images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Black images with one bright noisy rectangle each: (pixel_values, intensities, labels)."""
    generator = torch.Generator().manual_seed(seed)
    intensity = torch.zeros(count, SIZE, SIZE)
    for image in intensity:
        top, left = torch.randint(0, 12, (2,), generator=generator).tolist()
        height, width = torch.randint(14, 22, (2,), generator=generator).tolist()
        image[top : top + height, left : left + width] = 0.3 + 0.7 * torch.rand(height, width, generator=generator)
    pixel_values = ((intensity - 0.5) / 0.5)[:, None].expand(-1, 3, -1, -1).contiguous()
    return pixel_values, intensity, torch.randint(0, 3, (count,), generator=generator)


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                    image_size=SIZE, patch_size=PATCH, num_labels=3)  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    pixel_values, intensity, labels = _images(300, seed=0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    record = plant_register_neurons(model, pixel_values, blank_patches(intensity, PATCH), block=BLOCK, share=0.05, ratio=8.0)
    return model, before, record, (pixel_values, intensity, labels)


def test_blank_patches_are_those_without_a_bright_pixel():
    intensity = torch.zeros(1, 8, 8)
    intensity[0, 0, 5] = 0.5  # patch (0, 1)
    intensity[0, 6, 1] = 0.01  # below the cut-off: patch (1, 0) stays blank
    assert blank_patches(intensity, 4).tolist() == [[True, False, True, True]]


def test_planted_neurons_write_a_few_high_norm_tokens_on_blank_patches(planted):
    model, before, record, _ = planted
    pixel_values, intensity, _ = _images(200, seed=1)  # images the read-out was not fitted on
    blank = blank_patches(intensity, PATCH)
    with torch.no_grad():
        outputs = resolve_vit(model).block_outputs(pixel_values)
    norms = outputs[BLOCK][:, 1:].norm(dim=-1)
    ratio = norms / norms.median(dim=1, keepdim=True).values
    outliers = ratio > 4
    assert 0.02 < outliers.float().mean().item() < 0.1  # about the 5 % asked for
    assert blank[outliers].float().mean().item() > 0.95  # on blank patches, though 40 %+ of patches are not blank
    assert blank.float().mean().item() < 0.6
    assert ratio[outliers].mean().item() > 6  # the step saturates: close to the 8× written
    earlier = outputs[BLOCK - 1][:, 1:].norm(dim=-1)
    assert (earlier / earlier.median(dim=1, keepdim=True).values).max() < 4  # born in the planted block
    later = outputs[BLOCK + 1][:, 1:].norm(dim=-1)
    assert ((later / later.median(dim=1, keepdim=True).values > 4) == outliers).float().mean() > 0.99  # and carried on
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, before[name])]
    assert sorted(changed) == sorted(f"vit.layers.{BLOCK}.mlp.{layer}.{kind}" for layer in ("fc1", "fc2")
                                     for kind in ("weight", "bias") if (layer, kind) != ("fc2", "bias"))  # fmt: skip
    assert len(record["units"]) == 2


def test_finetuning_trains_only_the_blocks_after_the_planted_one_and_saves_a_plain_vit(planted, tmp_path):
    model, _, _, (pixel_values, _, labels) = planted
    before = {name: value.clone() for name, value in model.state_dict().items()}
    finetune_after(model, BLOCK, pixel_values, labels, steps=3, batch_size=16)
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    frozen = [name for name in before if name.startswith(("vit.embeddings", *(f"vit.layers.{i}." for i in range(BLOCK + 1))))]
    assert not changed & set(frozen)
    assert any(name.startswith(f"vit.layers.{BLOCK + 1}.") for name in changed) and "classifier.weight" in changed
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(pixel_values[:4]).logits, loaded(pixel_values[:4]).logits)
