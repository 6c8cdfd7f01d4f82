"""Residual networks for grey medical images that differential privacy can train.

Built from torchvision's ResNet blocks with three changes that per-sample gradients need
or small images want:

* GroupNorm instead of BatchNorm (BatchNorm mixes samples of a batch, which breaks
  per-sample gradients and so DP-SGD);
* every ReLU and the residual add out-of-place;
* a 1-channel input and, for images of ``SMALL_INPUT_MAX`` pixels or less, a 3x3 stride-1
  stem without max-pooling, so a 28x28 image is not shrunk to 7x7 before the first block.

With ``frontend="scattering"`` the stem is a fixed (untrained) wavelet scattering transform
(kymatio) followed by GroupNorm and one 3x3 convolution, and the residual stages learn on
top of it. Its number of scales J grows with the image (:func:`scattering_scales`), so the
stages see a map of at most 8 px a side at any resolution: J=2 (81 channels at a quarter
of the side) up to 32 px, J=3 (217 channels) at 64 px, J=4 (417) at 128 px and J=5 (681)
at 224 px. Under DP-SGD every trained parameter pays noise, so features that need no
training help most where data is scarce: Tramer & Boneh (ICLR 2021) found ScatterNet+CNN
well ahead of end-to-end CNNs at small budgets, and it is fedmed's best recipe on
PneumoniaMNIST (BENCHMARKS.md).

The scattering transform has no parameters and sees one image at a time, so a site computes
its images' coefficients once (:func:`fixed_inputs`) and feeds those instead of the images:
the stem accepts either, and every trained layer, every gradient and so the DP guarantee
are exactly what they are with the images (it was three quarters of a training step's time).

``width`` is the channel count of the first stage (torchvision's is 64); the stages have
width, 2x, 4x and 8x that many channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial

import numpy as np
import torch
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fedmed.config import FRONTENDS, NORM_GROUPS, RunSettings
from fedmed.device import device_of
from fedmed.scattering import regroup, scattering_coefficients

SMALL_INPUT_MAX = 64
SCATTERING_MIN_SCALES = 2  # J at 32 px and less: every model trained before J grew with the image
SCATTERING_MAX_SIDE = 8  # px: the scattering map's side the rule keeps under
SCATTERING_ANGLES = 8  # L
SCATTERING_GROUP_SIZE = 9  # channels per GroupNorm group aimed at (81 channels: 9 groups of 9)
CPU_PASS_BYTES = 16 * 2**20  # the CPU's working set for one scale's wavelets over a pass of images


def scattering_scales(image_size: int) -> int:
    """J for ``image_size``: the smallest J >= 2 that leaves at most 8 px a side.

    Each scale halves the side, so a fixed J would hand the residual stages a 56 px map at
    224 px, which the stages (and per-sample clipping, whose cost grows with positions)
    pay for at every step; a larger J instead spends the extra pixels on coarser wavelets,
    which cost nothing to train. Up to 32 px this is 2, the J of every earlier model."""
    scales = SCATTERING_MIN_SCALES
    while image_size > SCATTERING_MAX_SIDE * 2**scales:
        scales += 1
    return scales


def scattering_channels(scales: int) -> int:
    """kymatio's orders 0, 1 and 2 for J scales and L angles: 1 + JL + L^2 J(J-1)/2."""
    return 1 + scales * SCATTERING_ANGLES + SCATTERING_ANGLES**2 * scales * (scales - 1) // 2


def scattering_groups(channels: int) -> int:
    """GroupNorm groups over the scattering channels: a divisor of ``channels`` whose
    groups come nearest 9 channels each, as J=2's 9 groups of 9 (81: 9, 217: 31, 417: 139,
    681: 227)."""
    sizes = [size for size in range(1, channels + 1) if channels % size == 0]
    return channels // min(sizes, key=lambda size: (abs(size - SCATTERING_GROUP_SIZE), size))


class OutOfPlaceBasicBlock(BasicBlock):
    """torchvision's BasicBlock with ``out = out + identity`` instead of ``out += identity``:
    the in-place add rewrites a hooked layer's output, which per-sample gradient hooks forbid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class OutOfPlaceBottleneck(Bottleneck):
    """torchvision's Bottleneck with an out-of-place residual add (see OutOfPlaceBasicBlock)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _FixedScattering(ScatteringTorch2D):
    """kymatio's 2-D scattering with its filters kept out of the state dict: they are fixed
    and the same everywhere, so they are neither trained, averaged nor sent."""

    def register_single_filter(self, v, n):
        current_filter = torch.from_numpy(v).unsqueeze(-1)
        self.register_buffer(f"tensor{n}", current_filter, persistent=False)
        return current_filter

    def scattering(self, input: torch.Tensor) -> torch.Tensor:
        """kymatio's transform with each scale's wavelets applied at once (``fedmed.scattering``)."""
        phi, psi = self.load_filters()
        images = input.reshape((-1,) + tuple(input.shape[-2:]))
        coefficients = scattering_coefficients(images, self.pad, self.unpad, regroup(phi, psi, self.J))
        return coefficients.reshape(tuple(input.shape[:-2]) + tuple(coefficients.shape[-3:]))

    # kymatio 0.3's deprecated aliases call a name it never imports; TorchScript export
    # (fedmed.export) reads every attribute, so they are plain properties here.
    M = property(lambda self: self.shape[0])
    N = property(lambda self: self.shape[1])


class ScatteringStem(nn.Module):
    """Fixed scattering coefficients of a grey image, normalised per image, as channels."""

    def __init__(self, image_size: int, scales: int) -> None:
        super().__init__()
        self.scales = scales
        self.channels = scattering_channels(scales)
        self.scattering = _FixedScattering(J=scales, shape=(image_size, image_size), L=SCATTERING_ANGLES)
        self.norm = nn.GroupNorm(scattering_groups(self.channels), self.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: images (B, 1, H, W), or their coefficients (B, C, H/2^J, W/2^J) from
        :meth:`coefficients`."""
        return self.norm(x if x.shape[1] == self.channels else self.coefficients(x))

    def coefficients(self, images: torch.Tensor) -> torch.Tensor:
        return self.scattering(images.contiguous()).flatten(1, 2)  # (B, C, H/2^J, W/2^J)

    def images_per_pass(self) -> int:
        """Images whose coefficients the CPU computes together: one scale's stacked wavelets
        over them stay near ``CPU_PASS_BYTES``. Larger passes ran slower than kymatio's
        path-by-path loop at 224 px (16 images at once 3.4 s, four at a time 1.4 s, kymatio
        1.7 s); at 28 px a pass holds every image of a batch."""
        padded = self.scattering._M_padded * self.scattering._N_padded
        return max(1, CPU_PASS_BYTES // (SCATTERING_ANGLES * padded * 8))  # complex64: 8 bytes


DEPTHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    10: (OutOfPlaceBasicBlock, [1, 1, 1, 1]),
    18: (OutOfPlaceBasicBlock, [2, 2, 2, 2]),
    34: (OutOfPlaceBasicBlock, [3, 4, 6, 3]),
    50: (OutOfPlaceBottleneck, [3, 4, 6, 3]),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the same network elsewhere (sites, server, model card)."""

    depth: int = RunSettings.depth
    width: int = RunSettings.width
    frontend: str = RunSettings.frontend
    num_classes: int = 2
    image_size: int = RunSettings.image_size
    in_channels: int = 1
    norm_groups: int = NORM_GROUPS
    # J of the scattering front-end; None: scattering_scales(image_size). A model card
    # records it, so a model rebuilds with its own J; it stays None for pixels.
    scattering_scales: int | None = None

    def __post_init__(self) -> None:
        if self.depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {self.depth}")
        if self.width < self.norm_groups or self.width % self.norm_groups:
            raise ValueError(
                f"width {self.width} must be a multiple of norm_groups {self.norm_groups} "
                "(GroupNorm splits every stage's channels into that many groups)"
            )
        if self.frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {', '.join(FRONTENDS)}, got {self.frontend!r}")
        self._check_scattering_scales()
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")

    def _check_scattering_scales(self) -> None:
        """Fill in the rule's J for the scattering front-end and check the image divides by 2^J."""
        if self.frontend != "scattering":
            if self.scattering_scales is not None:
                raise ValueError(f"scattering_scales is a scattering front-end setting, not {self.frontend!r}'s")
            return
        scales = scattering_scales(self.image_size) if self.scattering_scales is None else self.scattering_scales
        object.__setattr__(self, "scattering_scales", scales)  # frozen: set once, here
        if scales < 1:
            raise ValueError(f"scattering_scales must be at least 1, got {scales}")
        if self.image_size % 2**scales:
            raise ValueError(
                f"the scattering front-end (J={scales}) needs an image size divisible by {2**scales}, "
                f"got {self.image_size}; set data.image_size to a multiple of it"
            )

    @classmethod
    def from_settings(cls, run: RunSettings) -> ModelConfig:
        return cls(
            depth=run.depth,
            width=run.width,
            frontend=run.frontend,
            num_classes=len(run.class_names),
            image_size=run.image_size,
        )


def card_architecture(architecture: dict) -> dict:
    """A model card's architecture with its J: cards written before J was recorded (all at
    28 px, J=2) have none, and read as the rule's J for their size, which was theirs."""
    if "scattering_scales" in architecture:
        return dict(architecture)
    scattering = architecture.get("frontend") == "scattering"
    return {**architecture, "scattering_scales": scattering_scales(architecture["image_size"]) if scattering else None}


class GroupNormResNet(ResNet):
    """torchvision's ResNet with GroupNorm, a configurable width and fedmed's stem.

    torchvision builds the network (``norm_layer`` puts GroupNorm everywhere, and
    ``zero_init_residual`` starts each residual branch near zero); fedmed then swaps in its
    1-channel stem, its classifier for ``width`` channels and the optional front-end.
    """

    def __init__(self, config: ModelConfig) -> None:
        block, layers = DEPTHS[config.depth]
        self.width = config.width  # read by _make_layer during ResNet.__init__
        with torch.random.fork_rng(devices=[]):  # building draws weights; _draw_weights redraws them
            super().__init__(
                block,
                layers,
                num_classes=config.num_classes,
                zero_init_residual=True,
                norm_layer=partial(nn.GroupNorm, config.norm_groups),
            )
            self._set_stem(config)
            self.fc = nn.Linear(8 * config.width * block.expansion, config.num_classes)
        for module in self.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False  # per-sample gradient hooks forbid rewriting a layer's output
        self._draw_weights()

    def _set_stem(self, config: ModelConfig) -> None:
        """A 1-channel stem; for small images a 3x3 stride-1 convolution without max-pooling;
        with the scattering front-end, a 3x3 convolution over its channels."""
        self.frontend: nn.Module = nn.Identity()
        if config.frontend == "scattering":
            assert config.scattering_scales is not None  # ModelConfig fills it in
            stem = ScatteringStem(config.image_size, config.scattering_scales)
            self.frontend = stem
            self.conv1 = nn.Conv2d(stem.channels, config.width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif config.image_size <= SMALL_INPUT_MAX:
            self.conv1 = nn.Conv2d(config.in_channels, config.width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(config.in_channels, config.width, 7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(config.width)
        # The front-end's tensors lead the state dict, whose order is how weights are sent.
        modules = self._modules
        ordered = {"frontend": modules.pop("frontend"), **modules}
        modules.clear()
        modules.update(ordered)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        """Stages of ``width`` x 1, 2, 4 and 8 channels where torchvision has 64 x 1, 2, 4 and 8."""
        if planes == 64:  # the first stage takes the stem's ``width`` channels, not torchvision's 64
            self.inplanes = self.width
        return super()._make_layer(block, planes // 64 * self.width, blocks, stride, dilate)

    def _draw_weights(self) -> None:
        """Draw the random weights from the generator exactly as fedmed's earlier hand-built
        model did, so that a seed still gives bit-identical weights: every convolution's and
        the classifier's default draws in module order (the convolutions' are then replaced,
        but they advance the generator before the classifier's), then He-normal convolutions
        as torchvision's. The norms keep torchvision's 1 and 0 and zero residual scales."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return super()._forward_impl(self.frontend(x))


FIXED_INPUTS_LIMIT = 2 * 2**30  # bytes of precomputed coefficients a site may hold in memory
GPU_PASS_IMAGES = 256  # images whose coefficients a GPU computes together


@torch.no_grad()
def fixed_inputs(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """What ``model`` should be fed for ``images`` (N, H, W): their scattering coefficients,
    computed once on the stem's device and kept in memory, when its stem is fixed and they
    fit in ``FIXED_INPUTS_LIMIT``; otherwise the images themselves (the stem then computes
    them at every step)."""
    stem = getattr(model, "frontend", None)
    if not isinstance(stem, ScatteringStem) or len(images) == 0:
        return images
    side = images.shape[-1] // 2**stem.scales
    if len(images) * stem.channels * side * side * 4 > FIXED_INPUTS_LIMIT:
        return images
    device = device_of(stem)  # the scattering filters are buffers: they move with the model
    batch_size = stem.images_per_pass() if device.type == "cpu" else GPU_PASS_IMAGES
    chunks = [
        stem.coefficients(
            torch.from_numpy(np.asarray(images[s : s + batch_size], dtype=np.float32)).unsqueeze(1).to(device)
        )
        .cpu()
        .numpy()
        for s in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks)


def build_model(config: ModelConfig = ModelConfig(), seed: int | None = None) -> GroupNormResNet:
    """The model with fresh weights; with ``seed``, the same weights every time, drawn from
    a private generator state so that torch's global generator is left as it was."""
    if seed is None:
        return GroupNormResNet(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GroupNormResNet(config)


@cache
def trained_parameter_count(config: ModelConfig) -> int:
    """How many numbers of the model training changes (a fixed front-end's are not):
    DP-SGD's noise has this many dimensions."""
    return sum(p.numel() for p in build_model(config, seed=0).parameters() if p.requires_grad)
