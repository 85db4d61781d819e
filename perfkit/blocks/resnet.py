"""ResNet (He et al., 2016) and the residual blocks that share its epilogue: basic, bottleneck, WRC, scaled.

Every block here ends with ``ResidualEpilogue``: ``relu(alpha * bn(y) + beta * shortcut(x))`` where ``y``
is the residual branch's last convolution. ResNet's blocks fix ``alpha = beta = 1`` (as buffers, so the
parameter counts equal torchvision's), the weighted residual connection learns them, and residual scaling
fixes ``alpha`` to a constant below one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from perfkit.blocks.layers import ResidualEpilogue, conv1x1, conv3x3, init_weights
from perfkit.registry import register


def make_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """A residual block's shortcut: identity where the shapes allow, else the paper's option B (1×1 conv + BN)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions and a shortcut; the stride is on the first 3×3 (ResNet-18/34).

    ``alpha``, ``beta`` and ``learnable`` configure the epilogue: the defaults are ResNet's block,
    ``learnable=True`` is the weighted residual connection, a constant ``alpha < 1`` is residual scaling.
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, alpha: float = 1.0,
                 beta: float = 1.0, learnable: bool = False) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut = make_shortcut(in_channels, out_channels, stride)
        self.epilogue = ResidualEpilogue(out_channels, alpha, beta, learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.relu(self.bn1(self.conv1(x))))
        return self.epilogue(y, self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 → 1×1 expand, with the stride on the 3×3 (torchvision's ResNet v1.5).

    ``planes`` is the width of the 3×3; the output has ``out_channels`` channels, ``expansion * planes``
    (4×) unless given (CSPNet's blocks use 2×).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = self.expansion * planes if out_channels is None else out_channels
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = make_shortcut(in_channels, out_channels, stride)
        self.epilogue = ResidualEpilogue(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.epilogue(self.conv3(y), self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for ImageNet: 7×7/2 stem, 3×3/2 max pool, four stages of ``block``, global average pool, FC.

    ``layers`` gives the number of blocks per stage; ``block_kwargs`` go to every block (``learnable=True``
    builds a ResNet of WRC blocks). Module names follow torchvision (``conv1``, ``layer1``, ``fc``).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
                 num_classes: int = 1000, **block_kwargs: Any) -> None:
        super().__init__()
        self.in_channels = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, block_kwargs)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, block_kwargs)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, block_kwargs)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, block_kwargs)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, num_blocks: int, stride: int,
                    block_kwargs: dict[str, Any]) -> nn.Sequential:
        # The first block of a stage downsamples (stride) and widens; the rest keep the shape.
        layers = [block(self.in_channels, planes, stride, **block_kwargs)]
        self.in_channels = planes * block.expansion
        layers += [block(self.in_channels, planes, **block_kwargs) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# Blocks are measured where they sit in their network: ResNet-18's and ResNet-50's first stage, 56×56.
@register("basic", kind="block", bench_shape=(64, 56, 56), test_shape=(64, 8, 8), in_channels=64, out_channels=64)
def basic(in_channels: int, out_channels: int, stride: int = 1) -> BasicBlock:
    """ResNet basic block: 3×3-3×3 + identity/projection shortcut, relu(bn2(y) + x) (He et al. 2016)."""
    return init_weights(BasicBlock(in_channels, out_channels, stride))


@register("bottleneck", kind="block", bench_shape=(256, 56, 56), test_shape=(256, 8, 8), in_channels=256, planes=64)
def bottleneck(in_channels: int, planes: int, stride: int = 1) -> Bottleneck:
    """ResNet bottleneck: 1×1-3×3-1×1, expansion 4, stride on the 3×3 (ResNet-50 v1.5 layer1)."""
    return init_weights(Bottleneck(in_channels, planes, stride))


@register("wrc", kind="block", bench_shape=(64, 56, 56), test_shape=(64, 8, 8), in_channels=64, out_channels=64)
def wrc(in_channels: int, out_channels: int, stride: int = 1) -> BasicBlock:
    """Weighted residual connection: relu(alpha*bn2(conv2(..)) + beta*shortcut(x)), alpha, beta learnable, init 1."""
    return init_weights(BasicBlock(in_channels, out_channels, stride, learnable=True))


@register("scaled", kind="block", bench_shape=(64, 56, 56), test_shape=(64, 8, 8), in_channels=64, out_channels=64,
          scale=0.2)
def scaled(in_channels: int, out_channels: int, stride: int = 1, scale: float = 0.2) -> BasicBlock:
    """Residual scaling: relu(scale*bn2(conv2(..)) + shortcut(x)), scale a fixed constant (Szegedy et al. 2017).

    Inception-v4/Inception-ResNet §3.3 scales the residual branch by a constant between 0.1 and 0.3
    before the addition, to keep very wide residual networks from dying early in training; 0.2 is the
    middle of that range. The seed's learnable scale on the *shortcut* is not the paper's method.
    """
    return init_weights(BasicBlock(in_channels, out_channels, stride, alpha=scale))


@register("resnet18", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 32, 32), layers=(2, 2, 2, 2),
          description="ResNet-18: basic blocks 2-2-2-2, torchvision's layout and parameter count")
@register("resnet34", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 32, 32), layers=(3, 4, 6, 3),
          description="ResNet-34: basic blocks 3-4-6-3, torchvision's layout and parameter count")
def resnet_basic(layers: tuple[int, int, int, int], num_classes: int = 1000) -> ResNet:
    """ResNet of basic blocks (ResNet-18/34), torchvision's layout and parameter count."""
    return ResNet(BasicBlock, layers, num_classes)


@register("resnet50", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 32, 32), layers=(3, 4, 6, 3),
          description="ResNet-50 v1.5: bottlenecks 3-4-6-3, torchvision's layout and parameter count")
@register("resnet101", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 32, 32), layers=(3, 4, 23, 3),
          description="ResNet-101 v1.5: bottlenecks 3-4-23-3, torchvision's layout and parameter count")
@register("resnet152", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 32, 32), layers=(3, 8, 36, 3),
          description="ResNet-152 v1.5: bottlenecks 3-8-36-3, torchvision's layout and parameter count")
def resnet_bottleneck(layers: tuple[int, int, int, int], num_classes: int = 1000) -> ResNet:
    """ResNet of bottleneck blocks (ResNet-50/101/152 v1.5), torchvision's layout and parameter count."""
    return ResNet(Bottleneck, layers, num_classes)


@register("wrc_resnet18", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 32, 32))
def wrc_resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 built of WRC blocks: torchvision's ResNet-18 plus a learnable alpha and beta per block."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, learnable=True)
