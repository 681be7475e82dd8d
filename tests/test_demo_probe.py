"""The demo's quick probe: CLS features of in-memory images and the L-BFGS linear probe."""

import torch
from conftest import make_vit

from singer_hf.demo.probe import cls_features, linear_probe_accuracy


def test_cls_features_are_the_last_block_output_before_the_final_norm(images):
    model = make_vit(classifier=True).train()
    features = cls_features(model, images, batch_size=1)
    model.eval()
    with torch.no_grad():
        expected = model.vit(pixel_values=images, output_hidden_states=True).hidden_states[-1][:, 0]
    torch.testing.assert_close(features, expected)
    model.train()
    cls_features(model, images)
    assert model.vit.training  # the caller's mode is restored


def test_linear_probe_separates_separable_features_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    centres = 3 * torch.randn(4, 16, generator=generator)
    features = centres[labels] + torch.randn(400, 16, generator=generator)
    assert linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:]) > 0.95
    noise = torch.randn(400, 16, generator=generator)
    assert linear_probe_accuracy(noise[:300], labels[:300], noise[300:], labels[300:]) < 0.5
