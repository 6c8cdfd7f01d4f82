"""Per-sample gradient clipping in one backward pass ("book-keeping" DP-SGD).

DP-SGD needs, for every sample i of a batch, its gradient g_i clipped to norm C, and then
the sum over i of the clipped gradients. Materialising every g_i for the whole network is
what makes DP training slow. This module instead:

1. records each layer's input during the forward pass;
2. runs one backward pass that computes only the gradients with respect to layer outputs
   (no parameter gradients);
3. gets each sample's gradient norm layer by layer, by the cheapest of three routes for
   that layer's shape, chosen by timing each once (see :class:`_Autotuner`):
   * ``grouped``: per-sample weight gradients from one grouped convolution,
   * ``unfold``: per-sample weight gradients from unfolded patches and a batched product,
   * ``ghost``: the norm without the gradient, from ||sum_t g_t a_t^T||^2 =
     sum_{t,t'} (a_t . a_t')(g_t . g_t'), where the patch Gram matrix a_t . a_t' is
     assembled from the Gram matrix of input pixels (no unfolding) — cheap when a layer
     has few positions and many channels;
4. computes each sample's clip factor c_i = min(1, C / ||g_i||) and forms the parameter
   gradients sum_i c_i g_i directly from the recorded inputs and output gradients.

Supported parameterised layers: Conv2d (groups=1, zero padding), Linear and GroupNorm; a
model with any other parameterised layer is refused with the layer's name.

Everything is computed on the device of the batch (the model's: ``fedmed.device``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from fedmed.device import exact_float32, synchronize

SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm)


@dataclass
class _Call:
    module: nn.Module
    inputs: torch.Tensor
    output: torch.Tensor


def check_supported(model: nn.Module) -> None:
    """Raise ValueError naming every layer the clipper cannot handle."""
    problems = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, SUPPORTED):
            problems.append(f"{name or 'model'} ({type(module).__name__})")
        elif isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            problems.append(f"{name} (Conv2d with groups={module.groups}, padding_mode={module.padding_mode})")
    if problems:
        raise ValueError(
            "per-sample clipping supports Conv2d (groups=1, zero padding), Linear and GroupNorm "
            f"layers only; unsupported: {', '.join(problems)}"
        )


class PerSampleClipper:
    """Accumulates sum_i clip(g_i) into ``param.grad`` for batches of a model."""

    def __init__(self, model: nn.Module, max_grad_norm: float, conv_route: str | None = None) -> None:
        """``conv_route`` forces one of ``CONV_ROUTES`` for every Conv2d (default: autotune)."""
        if conv_route is not None and conv_route not in CONV_ROUTES:
            raise ValueError(f"conv_route must be one of {', '.join(CONV_ROUTES)}, got {conv_route!r}")
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        check_supported(model)
        self.model = model
        self.max_grad_norm = max_grad_norm
        self._calls: list[_Call] = []
        self._recording = False
        self._tuner = _Autotuner(conv_route)
        self._handles = [
            module.register_forward_hook(self._record)
            for module in model.modules()
            if isinstance(module, SUPPORTED) and any(p.requires_grad for p in module.parameters(recurse=False))
        ]

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self._recording and output.requires_grad:
            self._calls.append(_Call(module, inputs[0].detach(), output))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def accumulate(
        self,
        inputs: torch.Tensor,
        per_sample_loss: Callable[[torch.Tensor], torch.Tensor],
        sample_weights: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model on ``inputs``; add the clipped per-sample gradients of
        ``per_sample_loss(outputs)`` (a vector, one loss per sample) to ``param.grad``, each
        scaled by its ``sample_weights`` entry after clipping (weights must lie in [0, 1], so
        no sample's contribution exceeds the clip norm).

        With ``groups`` (one group number 0..G-1 per sample, e.g. its patient), each group's
        summed gradient is clipped instead, so no group's contribution exceeds the clip norm;
        the weights then scale each sample's gradient before its group's sum is clipped.

        Returns (per-sample losses, gradient norms before clipping: per sample, or per group).
        On CUDA every float32 product is computed in float32, not TF32 (``exact_float32``):
        a norm computed short would let a clipped gradient pass the clip norm.
        """
        with exact_float32(inputs.device):
            return self._accumulate(inputs, per_sample_loss, sample_weights, groups)

    def _accumulate(
        self,
        inputs: torch.Tensor,
        per_sample_loss: Callable[[torch.Tensor], torch.Tensor],
        sample_weights: torch.Tensor | None,
        groups: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if sample_weights is not None and not bool(((sample_weights >= 0) & (sample_weights <= 1)).all()):
            raise ValueError(
                "sample weights after clipping must lie in [0, 1]: larger ones would raise the "
                "sensitivity above the clip norm"
            )
        self._calls = []
        self._recording = True
        try:
            losses = per_sample_loss(self.model(inputs))
        finally:
            self._recording = False
        calls, self._calls = self._calls, []
        output_grads = torch.autograd.grad(losses.sum(), [c.output for c in calls])
        batch = inputs.shape[0]
        with torch.no_grad():
            pieces = [_layer_pieces(call, grad, self._tuner) for call, grad in zip(calls, output_grads)]
            rows = batch
            if groups is not None:
                rows = int(groups.max()) + 1
                pieces = [_grouped(piece, groups, rows, sample_weights) for piece in pieces]
            squared = torch.zeros(rows, dtype=torch.float64, device=inputs.device)  # summed over layers in double
            for piece in pieces:
                squared += piece.squared_norms().double()
            norms = squared.sqrt().to(inputs.dtype)
            factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            if sample_weights is not None and groups is None:
                factors = factors * sample_weights.to(factors.dtype)
            for piece in pieces:
                for param, grad in piece.weighted_sums(factors):
                    if param.grad is None:
                        param.grad = grad.clone()
                    else:
                        param.grad += grad
        return losses.detach(), norms


# (a layer's parameter, a gradient for it): torch types a layer's parameters as Tensors
ParamGrads = list[tuple[torch.Tensor, torch.Tensor]]


class _Pieces(ABC):
    """A layer's contribution: per-sample squared norms and weighted gradient sums."""

    @abstractmethod
    def squared_norms(self) -> torch.Tensor: ...

    @abstractmethod
    def weighted_sums(self, factors: torch.Tensor) -> ParamGrads: ...


class _Instantiated(_Pieces):
    """Per-sample gradients held in full: ``per_sample[name]`` is (B, *param.shape)."""

    def __init__(self, per_sample: Sequence[tuple[torch.Tensor | None, torch.Tensor]]) -> None:
        self.per_sample = [(p, ps) for p, ps in per_sample if p is not None and p.requires_grad]

    def squared_norms(self) -> torch.Tensor:
        total = sum(ps.flatten(1).pow(2).sum(dim=1) for _, ps in self.per_sample)
        if not isinstance(total, torch.Tensor):  # sum() of nothing: only trainable layers are recorded
            raise ValueError("a layer without trainable parameters has no per-sample gradients")
        return total

    def weighted_sums(self, factors: torch.Tensor) -> ParamGrads:
        return [(p, torch.tensordot(factors, ps, dims=1)) for p, ps in self.per_sample]


class _GhostConv(_Pieces):
    """Conv2d norms without per-sample gradients; gradient sums by one weight-gradient pass."""

    def __init__(self, module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> None:
        self.module, self.x, self.g = module, x, g

    def squared_norms(self) -> torch.Tensor:
        m, x, g = self.module, self.x, self.g
        ph, pw = _padding(m)
        padded = F.pad(x, (pw, pw, ph, ph))
        width = padded.shape[3]
        pixels = padded.flatten(2)  # (B, C, P)
        pixel_gram = torch.bmm(pixels.transpose(1, 2), pixels)  # (B, P, P)
        rows, cols = g.shape[2], g.shape[3]
        on = x.device
        starts = (
            torch.arange(rows, device=on)[:, None] * m.stride[0] * width
            + torch.arange(cols, device=on)[None, :] * m.stride[1]
        ).flatten()
        kh, kw = m.kernel_size
        offsets = (
            torch.arange(kh, device=on)[:, None] * m.dilation[0] * width
            + torch.arange(kw, device=on)[None, :] * m.dilation[1]
        ).flatten()
        index = offsets[:, None] + starts[None, :]  # (kernel positions, T)
        patch_gram = pixel_gram[:, index[:, :, None], index[:, None, :]].sum(dim=1)  # (B, T, T)
        grads = g.flatten(2)  # (B, out, T)
        grad_gram = torch.bmm(grads.transpose(1, 2), grads)
        squared = (patch_gram * grad_gram).sum(dim=(1, 2))
        if m.bias is not None and m.bias.requires_grad:
            squared = squared + grads.sum(dim=2).pow(2).sum(dim=1)
        return squared

    def weighted_sums(self, factors: torch.Tensor) -> ParamGrads:
        m = self.module
        scaled = self.g * factors[:, None, None, None]
        sums: ParamGrads = []
        if m.weight.requires_grad:
            weight = conv2d_weight(self.x, m.weight.shape, scaled, m.stride, m.padding, m.dilation)
            sums.append((m.weight, weight))
        if m.bias is not None and m.bias.requires_grad:
            sums.append((m.bias, scaled.sum(dim=(0, 2, 3))))
        return sums


def _padding(m: nn.Conv2d) -> tuple[int, int]:
    """A Conv2d's zero padding (rows, columns); a padding given by name ("same", "valid") is refused."""
    if isinstance(m.padding, str):
        raise ValueError(f"per-sample clipping needs a Conv2d's padding in pixels, not {m.padding!r}")
    return m.padding[0], m.padding[1]


def _conv_unfold(m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> _Instantiated:
    patches = F.unfold(x, m.kernel_size, m.dilation, _padding(m), m.stride)  # (B, d, T)
    per_sample = torch.bmm(g.flatten(2), patches.transpose(1, 2))  # (B, out, d)
    return _Instantiated([(m.weight, per_sample.view(-1, *m.weight.shape)), (m.bias, g.sum(dim=(2, 3)))])


def _conv_grouped(m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> _Instantiated:
    # Correlating sample b's input with its own output gradient gives its weight gradient:
    # one convolution with the batch as groups, the gradients as kernels.
    batch, in_channels = x.shape[:2]
    out_channels = g.shape[1]
    kernels = g.reshape(batch * out_channels, 1, *g.shape[2:])
    result = F.conv2d(x.transpose(0, 1), kernels, stride=m.dilation, padding=m.padding, dilation=m.stride, groups=batch)
    kh, kw = m.kernel_size
    result = result[:, :, :kh, :kw].reshape(in_channels, batch, out_channels, kh, kw)
    return _Instantiated([(m.weight, result.permute(1, 2, 0, 3, 4)), (m.bias, g.sum(dim=(2, 3)))])


CONV_ROUTES: dict[str, Callable[[nn.Conv2d, torch.Tensor, torch.Tensor], _Pieces]] = {
    "grouped": _conv_grouped,
    "unfold": _conv_unfold,
    "ghost": _GhostConv,
}


def _route_costs(m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    """Multiply-adds per sample of each route, to rule out hopeless ones before timing."""
    positions = g.shape[2] * g.shape[3]
    ph, pw = _padding(m)
    padded = (x.shape[2] + 2 * ph) * (x.shape[3] + 2 * pw)
    kernel = m.kernel_size[0] * m.kernel_size[1]
    instantiate = positions * x.shape[1] * kernel * g.shape[1]
    ghost = padded**2 * x.shape[1] + positions**2 * (kernel + g.shape[1])
    return {"grouped": instantiate, "unfold": instantiate, "ghost": ghost}


class _Autotuner:
    """Remembers, per layer and per-sample input shape, which conv route ran fastest.

    Routes estimated at more than ``SLACK`` times the cheapest one's multiply-adds are not
    even tried; the rest are timed once, on the first batch that reaches the layer. On CUDA
    the clock is read only after the device has finished (``fedmed.device.synchronize``):
    kernels run asynchronously, and without it the timing would be of their launch.
    """

    SLACK = 4.0

    def __init__(self, forced: str | None = None) -> None:
        self.forced = forced
        self.choice: dict[tuple, str] = {}

    def pieces(self, m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> _Pieces:
        if self.forced:
            return CONV_ROUTES[self.forced](m, x, g)
        key = (id(m), tuple(x.shape[1:]))  # Poisson batches vary in size; the choice holds
        if key not in self.choice:
            costs = _route_costs(m, x, g)
            cheapest = min(costs.values())
            timings: dict[str, float] = {}
            for name, cost in costs.items():
                if cost <= self.SLACK * cheapest:
                    synchronize(x.device)  # the work queued before is not this route's
                    start = time.perf_counter()
                    CONV_ROUTES[name](m, x, g).squared_norms()
                    synchronize(x.device)
                    timings[name] = time.perf_counter() - start
            self.choice[key] = min(timings, key=timings.__getitem__)
        return CONV_ROUTES[self.choice[key]](m, x, g)


def _grouped(piece: _Pieces, groups: torch.Tensor, count: int, weights: torch.Tensor | None) -> _Instantiated:
    """A layer's per-sample gradients (optionally weighted) summed within each group."""
    if isinstance(piece, _GhostConv):  # ghost norms cannot be summed by group: instantiate
        piece = _conv_unfold(piece.module, piece.x, piece.g)
    if not isinstance(piece, _Instantiated):  # the only other kind
        raise TypeError(f"cannot sum a layer's {type(piece).__name__} by group")
    summed = []
    for param, per_sample in piece.per_sample:
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample.dtype).view(-1, *[1] * (per_sample.dim() - 1))
        total = torch.zeros((count, *per_sample.shape[1:]), dtype=per_sample.dtype, device=per_sample.device)
        summed.append((param, total.index_add_(0, groups, per_sample)))
    return _Instantiated(summed)


def _layer_pieces(call: _Call, grad: torch.Tensor, tuner: _Autotuner) -> _Pieces:
    module, x = call.module, call.inputs
    if isinstance(module, nn.Conv2d):
        return tuner.pieces(module, x, grad)
    if isinstance(module, nn.GroupNorm):
        normalised = F.group_norm(x, module.num_groups, eps=module.eps)
        return _Instantiated(
            [(module.weight, (normalised * grad).flatten(2).sum(dim=2)), (module.bias, grad.flatten(2).sum(dim=2))]
        )
    if not isinstance(module, nn.Linear):  # only SUPPORTED layers are recorded
        raise ValueError(f"per-sample clipping does not support {type(module).__name__} layers")
    # Linear: any dimensions between batch and features count as positions.
    a = x.reshape(x.shape[0], -1, x.shape[-1])
    g = grad.reshape(grad.shape[0], -1, grad.shape[-1])
    return _Instantiated([(module.weight, torch.bmm(g.transpose(1, 2), a)), (module.bias, g.sum(dim=1))])
