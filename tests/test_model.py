"""The ResNet variants: Opacus accepts them and one DP step trains them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator
from torch import nn

from fedmed.model import ModelConfig, build_model, fixed_inputs
from fedmed.privacy.clipping import PerSampleClipper

VARIANTS = [
    ModelConfig(depth=18, width=8, image_size=28),
    ModelConfig(depth=34, width=8, image_size=28),
    ModelConfig(depth=50, width=8, image_size=28),
    ModelConfig(depth=18, width=32, image_size=64),
    ModelConfig(depth=18, width=8, image_size=128, num_classes=3),
    ModelConfig(depth=50, width=8, image_size=96),
    ModelConfig(depth=10, width=8, image_size=28, frontend="scattering"),
    ModelConfig(depth=18, width=16, image_size=64, frontend="scattering"),
]


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: f"resnet{c.depth}-w{c.width}-{c.image_size}px-{c.frontend}")
def test_variant_passes_opacus_validation_and_trains_one_dp_step(config):
    model = build_model(config)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    x = torch.rand(3, 1, config.image_size, config.image_size)
    y = torch.tensor([0, 1, 1])
    assert model(x).shape == (3, config.num_classes)
    before = [p.detach().clone() for p in model.parameters()]
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    _, norms = clipper.accumulate(x, lambda out: F.cross_entropy(out, y, reduction="none"))
    clipper.remove()
    assert norms.shape == (3,) and bool((norms > 0).all())
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert total <= 3 * 1.0 + 1e-4, "three clipped samples sum to norm at most 3 C"
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for old, p in zip(before, model.parameters()):
        assert torch.equal(old, p) == (not p.grad.any()), "exactly the parameters with gradients moved"
    assert not torch.equal(before[0], model.conv1.weight) and not torch.equal(before[-1], model.fc.bias)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_small_images_keep_their_resolution_in_the_stem():
    small = build_model(ModelConfig(image_size=28))
    large = build_model(ModelConfig(image_size=224))
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)


def test_width_sets_the_channels():
    model = build_model(ModelConfig(width=16))
    assert model.conv1.out_channels == 16 and model.fc.in_features == 128


@pytest.mark.parametrize("bad", [dict(depth=20), dict(width=12), dict(num_classes=1), dict(frontend="wavelets"),
                                 dict(frontend="scattering", image_size=30)])
def test_bad_configurations_are_explained(bad):
    with pytest.raises(ValueError, match="depth|width|num_classes|frontend|divisible by 4"):
        ModelConfig(**bad)


def test_the_scattering_front_end_is_fixed_and_never_leaves_a_site():
    """Its filters are the same at every site: they are not in the state dict (so neither
    averaged nor sent) and get no gradient; the images' scattering channels feed conv1."""
    config = ModelConfig(depth=10, width=8, image_size=28, frontend="scattering")
    model, other = build_model(config, seed=0), build_model(config, seed=1)
    assert not any(key.startswith("frontend.scattering") for key in model.state_dict())
    assert all(not p.requires_grad or "frontend.scattering" not in name for name, p in model.named_parameters())
    assert model.conv1.in_channels == 81
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model.frontend.scattering(x), other.frontend.scattering(x)), "filters do not depend on seeds"
    assert model(x).shape == (2, 2)


def test_precomputed_scattering_coefficients_train_exactly_as_the_images_do():
    """A site feeds its images' scattering coefficients, computed once, instead of the
    images: the outputs and every clipped per-sample gradient must be the same, so the DP
    step (and its guarantee) is unchanged."""
    config = ModelConfig(depth=10, width=8, image_size=28, frontend="scattering")
    images = np.random.default_rng(0).random((6, 28, 28), dtype=np.float32)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    inputs = fixed_inputs(build_model(config), images)
    assert inputs.shape == (6, 81, 7, 7), "coefficients, not the images"
    gradients = []
    for fed in (torch.from_numpy(images).unsqueeze(1), torch.from_numpy(inputs)):
        model = build_model(config, seed=1)
        clipper = PerSampleClipper(model, max_grad_norm=0.1)
        losses, norms = clipper.accumulate(fed, lambda out: F.cross_entropy(out, labels, reduction="none"))
        gradients.append((losses, norms, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_a, norm_a, grad_a), (loss_b, norm_b, grad_b) = gradients
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(norm_a, norm_b)
    assert bool((norm_a > 0.1).all()), "every sample is clipped, so the clip factors are exercised"
    for a, b in zip(grad_a, grad_b):
        torch.testing.assert_close(a, b)


def test_a_model_without_a_fixed_stem_is_fed_the_images():
    images = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    assert fixed_inputs(build_model(ModelConfig(depth=10, width=8, image_size=28)), images) is images
