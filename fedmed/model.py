"""Residual networks for grey medical images that differential privacy can train.

Built from torchvision's ResNet blocks with three changes that per-sample gradients need
or small images want:

* GroupNorm instead of BatchNorm (BatchNorm mixes samples of a batch, which breaks
  per-sample gradients and so DP-SGD);
* every ReLU and the residual add out-of-place;
* a 1-channel input and, for images of ``SMALL_INPUT_MAX`` pixels or less, a 3x3 stride-1
  stem without max-pooling, so a 28x28 image is not shrunk to 7x7 before the first block.

``width`` is the channel count of the first stage (torchvision's is 64); the stages have
width, 2x, 4x and 8x that many channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fedmed.config import NORM_GROUPS, RunSettings

SMALL_INPUT_MAX = 64


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


DEPTHS: dict[int, tuple[type[nn.Module], list[int]]] = {
    18: (OutOfPlaceBasicBlock, [2, 2, 2, 2]),
    34: (OutOfPlaceBasicBlock, [3, 4, 6, 3]),
    50: (OutOfPlaceBottleneck, [3, 4, 6, 3]),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the same network elsewhere (sites, server, model card)."""

    depth: int = RunSettings.depth
    width: int = RunSettings.width
    num_classes: int = 2
    image_size: int = RunSettings.image_size
    in_channels: int = 1
    norm_groups: int = NORM_GROUPS

    def __post_init__(self) -> None:
        if self.depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {self.depth}")
        if self.width < self.norm_groups or self.width % self.norm_groups:
            raise ValueError(
                f"width {self.width} must be a multiple of norm_groups {self.norm_groups} "
                "(GroupNorm splits every stage's channels into that many groups)"
            )
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")

    @classmethod
    def from_settings(cls, run: RunSettings) -> ModelConfig:
        return cls(depth=run.depth, width=run.width, num_classes=len(run.class_names), image_size=run.image_size)


class GroupNormResNet(ResNet):
    """torchvision's ResNet with a configurable width, GroupNorm and an optional small stem."""

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes 64 channels and BatchNorm
        block, layers = DEPTHS[config.depth]
        groups = config.norm_groups
        self._norm_layer = lambda channels: nn.GroupNorm(groups, channels)
        self.inplanes = config.width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        if config.image_size <= SMALL_INPUT_MAX:
            self.conv1 = nn.Conv2d(config.in_channels, config.width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(config.in_channels, config.width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = self._norm_layer(config.width)
        self.relu = nn.ReLU()
        w = config.width
        self.layer1 = self._make_layer(block, w, layers[0])
        self.layer2 = self._make_layer(block, 2 * w, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * w, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * w, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * w * block.expansion, config.num_classes)
        for module in self.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Start each residual branch near zero, as torchvision's zero_init_residual does.
        for module in self.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)
            elif isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)


def build_model(config: ModelConfig = ModelConfig(), seed: int | None = None) -> GroupNormResNet:
    """The model with fresh weights; with ``seed``, the same weights every time, drawn from
    a private generator state so that torch's global generator is left as it was."""
    if seed is None:
        return GroupNormResNet(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GroupNormResNet(config)
