"""Where fedmed computes: the ``resources.device`` setting, checked when a command starts.

``auto`` is CUDA when torch finds it, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` name
one. A name that is not one of these, or CUDA that this machine lacks, is refused with the
setting's name and what to set instead, before any site, round or epoch starts: a device
found missing in round 3 would end a run whose first two rounds had already spent the
sites' privacy budgets.

What leaves a site never depends on the device: weights are packed from CPU copies
(``fedmed.weights.model_state``) and metrics are Python numbers.

This module loads torch only to resolve a name, so the settings' declarations can use
:func:`check_device_name` without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SETTING = "resources.device"
DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
_NAME = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?")


def check_device_name(name: str) -> None:
    """Refuse a device name fedmed does not know (no torch needed)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{SETTING} must be {DEVICE_NAMES}, got {name!r}")


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` stands for on this machine; raises ValueError naming
    ``resources.device``, the value and what to set when this machine cannot provide it."""
    check_device_name(name)
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f'{SETTING} = "{name}", but torch finds no CUDA device on this machine (torch '
            f'{torch.__version__}, CUDA build: {torch.version.cuda or "none"}); set {SETTING} = "cpu" '
            '(or "auto": CUDA where there is one)'
        )
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f'{SETTING} = "{name}", but this machine has {count} CUDA device(s), numbered from 0; '
            f'set {SETTING} = "cuda:{count - 1}" or lower, "cuda" or "cpu"'
        )
    return device


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    import torch

    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: CUDA runs kernels asynchronously, so a clock
    read without it measures their launch, not their work. Nothing to wait for on the CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


@contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """float32 convolutions and matrix products computed in float32 on CUDA, not in TF32
    (torch lets cuDNN convolutions use TF32 by default, which keeps 10 bits of mantissa).

    DP-SGD scales each record's gradient by the clip norm over its computed norm, and the
    noise is calibrated to the clip norm: a norm 0.1 % short would let a clipped gradient
    exceed the clip norm by as much. Scores and predictions stay those of the CPU to
    float32 rounding as well. Nothing changes on the CPU."""
    if device.type != "cuda":
        yield
        return
    import torch

    backends = torch.backends
    conv = getattr(backends.cudnn, "conv", None)  # torch 2.9 and later: the fp32_precision settings
    if conv is not None:
        matmul = backends.cuda.matmul
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    legacy = backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32
    backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = legacy
