"""One-pass per-sample clipping equals clipping each sample's own gradient."""

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from fedmed.model import ModelConfig, build_model
from fedmed.privacy.clipping import CONV_ROUTES, PerSampleClipper


def model_with_live_norms(seed: int = 0, **config) -> nn.Module:
    """A small ResNet in float64, so that batched and one-by-one arithmetic agree closely."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{"depth": 18, "width": 8, "image_size": 16, **config}))
    for module in model.modules():  # undo the zero init so every layer has gradients
        if isinstance(module, nn.GroupNorm):
            nn.init.normal_(module.weight, 1.0, 0.2)
            nn.init.normal_(module.bias, 0.0, 0.1)
    return model.double()


def batch(n: int, labels: list[int]):
    return torch.randn(n, 1, 16, 16, dtype=torch.float64), torch.tensor(labels)


def reference(model: nn.Module, x, y, max_norm: float, weights=None):
    """Per-sample gradients one sample at a time, clipped, weighted and summed."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    norms = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        norms.append(float(norm))
        factor = min(1.0, max_norm / (float(norm) + 1e-6)) * (1.0 if weights is None else float(weights[i]))
        for name, p in model.named_parameters():
            total[name] += factor * p.grad
    model.zero_grad(set_to_none=True)
    return total, torch.tensor(norms, dtype=torch.float64)


@pytest.mark.parametrize("route", [None, *CONV_ROUTES])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clipped_sum_matches_sample_by_sample_clipping(route, max_norm):
    model = model_with_live_norms()
    x, y = batch(5, [0, 1, 1, 0, 1])
    expected, expected_norms = reference(model, x, y, max_norm)
    clipper = PerSampleClipper(model, max_norm, conv_route=route)
    _, norms = clipper.accumulate(x, lambda out: F.cross_entropy(out, y, reduction="none"))
    torch.testing.assert_close(norms, expected_norms, rtol=1e-6, atol=1e-9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-9, msg=name)


def test_clipping_is_exact_behind_the_fixed_scattering_front_end():
    model = model_with_live_norms(3, depth=10, frontend="scattering")
    x, y = batch(4, [0, 1, 1, 0])
    expected, expected_norms = reference(model, x, y, 0.5)
    clipper = PerSampleClipper(model, 0.5)
    _, norms = clipper.accumulate(x, lambda out: F.cross_entropy(out, y, reduction="none"))
    torch.testing.assert_close(norms, expected_norms, rtol=1e-6, atol=1e-9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-9, msg=name)


def test_weights_scale_each_clipped_gradient_and_cannot_raise_the_sensitivity():
    model = model_with_live_norms(4)
    x, y = batch(5, [0, 1, 1, 0, 1])
    weights = torch.tensor([1.0, 0.35, 0.35, 1.0, 0.35], dtype=torch.float64)
    expected, _ = reference(model, x, y, 0.5, weights)
    clipper = PerSampleClipper(model, 0.5)
    loss = lambda out: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    clipper.accumulate(x, loss, weights)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-9, msg=name)
    with pytest.raises(ValueError, match="sensitivity"):
        clipper.accumulate(x, loss, weights * 2)


def test_norms_agree_with_opacus_per_sample_gradients():
    model = model_with_live_norms(1)
    x, y = batch(4, [1, 0, 1, 1])
    wrapped = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(wrapped(x), y, reduction="sum").backward()
    opacus_norms = torch.sqrt(sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in model.parameters()))
    wrapped._close()
    model.zero_grad(set_to_none=True)
    clipper = PerSampleClipper(model, 1.0)
    _, norms = clipper.accumulate(x, lambda out: F.cross_entropy(out, y, reduction="none"))
    torch.testing.assert_close(norms, opacus_norms, rtol=1e-6, atol=1e-9)


def test_gradients_accumulate_over_physical_batches():
    model = model_with_live_norms(2)
    x, y = batch(6, [0, 1, 0, 1, 1, 0])
    expected, _ = reference(model, x, y, 0.3)
    clipper = PerSampleClipper(model, 0.3)
    loss = lambda part: (lambda out: F.cross_entropy(out, y[part], reduction="none"))  # noqa: E731
    clipper.accumulate(x[:4], loss(slice(0, 4)))
    clipper.accumulate(x[4:], loss(slice(4, 6)))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-9)


def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm2d\)"):
        PerSampleClipper(model, 1.0)
