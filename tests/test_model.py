"""The ResNet variants: Opacus accepts them and one DP step trains them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator
from torch import nn

from fedmed.model import (
    ModelConfig,
    build_model,
    fixed_inputs,
    scattering_channels,
    scattering_groups,
    scattering_scales,
)
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


@pytest.mark.parametrize("size, scales", [(16, 2), (28, 2), (32, 2), (64, 3), (96, 4), (128, 4), (224, 5)])
def test_the_scattering_scales_grow_with_the_image_to_leave_at_most_8_px(size, scales):
    assert scattering_scales(size) == scales
    assert size // 2**scales <= 8 and (scales == 2 or size // 2 ** (scales - 1) > 8), "the smallest such J"


@pytest.mark.parametrize("scales, channels, groups", [(2, 81, 9), (3, 217, 31), (4, 417, 139), (5, 681, 227)])
def test_the_scattering_channels_split_into_groupnorm_groups(scales, channels, groups):
    assert scattering_channels(scales) == channels and scattering_groups(channels) == groups
    assert channels % groups == 0


@pytest.mark.parametrize("size", [16, 28, 32])
def test_a_scattering_model_of_32_px_or_less_is_the_j2_model_of_before(size):
    """Every model trained before J grew with the image (J=2, 81 channels, 9 GroupNorm
    groups) rebuilds with the same tensors, names and shapes: stored weights still load."""
    config = ModelConfig(depth=10, width=8, image_size=size, frontend="scattering")
    assert config.scattering_scales == 2
    model = build_model(config, seed=0)
    fixed = build_model(ModelConfig(depth=10, width=8, image_size=size, frontend="scattering", scattering_scales=2),
                        seed=0)
    state = model.state_dict()
    assert list(state)[:3] == ["frontend.norm.weight", "frontend.norm.bias", "conv1.weight"]
    assert state["frontend.norm.weight"].shape == (81,) and state["conv1.weight"].shape == (8, 81, 3, 3)
    assert model.frontend.norm.num_groups == 9
    assert [(k, v.shape) for k, v in state.items()] == [(k, v.shape) for k, v in fixed.state_dict().items()]
    assert all(torch.equal(state[k], v) for k, v in fixed.state_dict().items())


def test_a_64_px_scattering_model_gives_its_stages_an_8_px_map():
    config = ModelConfig(depth=10, width=8, image_size=64, frontend="scattering")
    model = build_model(config, seed=0).eval()
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    assert model.frontend(images).shape == (2, 217, 8, 8)
    assert model.conv1.in_channels == 217 and model(images).shape == (2, 2)
    coefficients = fixed_inputs(model, images.squeeze(1).numpy())
    assert coefficients.shape == (2, 217, 8, 8), "a site precomputes them at the model's J"
    torch.testing.assert_close(model(torch.from_numpy(coefficients)), model(images))


def test_a_cards_scattering_scales_win_over_the_rule():
    """A model card records J, so a model rebuilds with its own J whatever the rule says."""
    model = build_model(ModelConfig(depth=10, width=8, image_size=64, frontend="scattering", scattering_scales=2))
    assert model.conv1.in_channels == 81 and model.frontend(torch.rand(1, 1, 64, 64)).shape == (1, 81, 16, 16)


@pytest.mark.parametrize("bad, message", [
    (dict(frontend="scattering", image_size=60), r"\(J=3\) needs an image size divisible by 8, got 60"),
    (dict(frontend="scattering", image_size=64, scattering_scales=0), "scattering_scales must be at least 1"),
    (dict(frontend="pixels", scattering_scales=2), "scattering front-end setting"),
])
def test_bad_scattering_scales_are_explained(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**bad)


@pytest.mark.parametrize("size", [28, 64])
def test_fedmeds_scattering_gives_kymatios_coefficients_to_the_last_bit(size):
    """fedmed applies each scale's wavelets at once (fedmed.scattering); kymatio walks its
    paths one by one. Same filters, same arithmetic: the same coefficients, bit for bit and
    in kymatio's channel order (a swapped pair of paths would differ: random images give
    every path its own values)."""
    # kymatio's own module, imported by its path: kymatio.torch also loads its 3-D code
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D as Scattering2D

    scales = scattering_scales(size)
    stem = build_model(ModelConfig(depth=10, width=8, image_size=size, frontend="scattering")).frontend
    images = torch.from_numpy(np.random.default_rng(size).random((3, 1, size, size), dtype=np.float32))
    images[1] = images[1] ** 4  # a darker, skewed image beside the uniform ones
    reference = Scattering2D(J=scales, shape=(size, size), L=8)(images).flatten(1, 2)
    assert torch.equal(stem.coefficients(images), reference)
