"""DenseNet (Huang et al., 2017): the dense block, the transition, and the networks built from them."""

from __future__ import annotations

import torch
from torch import nn

from perfkit.blocks.layers import conv1x1, conv3x3, init_weights
from perfkit.registry import register


class DenseLayer(nn.Module):
    """One dense layer on the concat of every earlier feature map; returns its ``growth_rate`` new channels.

    Plain: BN-ReLU-3×3 conv. BC (``bottleneck=True``): BN-ReLU-1×1 conv to ``bn_size * growth_rate``
    channels, then BN-ReLU-3×3 conv. Attribute names follow torchvision (``norm1``, ``conv1``, ...).
    """

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool = True, bn_size: int = 4) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.norm1 = nn.BatchNorm2d(in_channels)
        if bottleneck:
            self.conv1 = conv1x1(in_channels, bn_size * growth_rate)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.conv2 = conv3x3(bn_size * growth_rate, growth_rate)
        else:
            self.conv1 = conv3x3(in_channels, growth_rate)

    def forward(self, concat: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.norm1(concat)))
        if self.bottleneck:
            out = self.conv2(torch.relu(self.norm2(out)))
        return out


class DenseBlock(nn.Module):
    """``num_layers`` dense layers; layer ``l`` sees ``in_channels + l * growth_rate`` channels.

    The output is the concat of the input and every layer's new features. This eager form materializes
    each concat, so its activation memory grows with the square of the depth; the ``triton`` variant
    (``perfkit.kernels.dense``) writes into one preallocated buffer instead.
    """

    def __init__(self, in_channels: int, num_layers: int, growth_rate: int, bottleneck: bool = True,
                 bn_size: int = 4) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, bottleneck, bn_size) for i in range(num_layers)
        )

    @property
    def out_channels(self) -> int:
        return self.in_channels + len(self.layers) * self.growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


class Transition(nn.Sequential):
    """Between dense blocks: BN-ReLU-1×1 conv to ``out_channels``, then 2×2 average pool, stride 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = conv1x1(in_channels, out_channels)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet for ImageNet: 7×7/2 stem and max pool, dense blocks joined by transitions, BN-ReLU, pool, FC.

    Each transition keeps ``compression`` of the channels (DenseNet-C); ``bottleneck`` selects BC layers.
    Module names follow torchvision (``features.denseblock1``, ``features.norm5``, ``classifier``).
    """

    def __init__(self, growth_rate: int, block_config: tuple[int, ...], num_init_features: int,
                 bottleneck: bool = True, bn_size: int = 4, compression: float = 0.5,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3,
                                                    bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(channels, num_layers, growth_rate, bottleneck, bn_size)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels = block.out_channels
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(channels, int(channels * compression)))
                channels = int(channels * compression)
        # The last block's output is pre-activation (its layers start with BN-ReLU): normalize it once more.
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.features(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


# DenseNet-121's third dense block (256 channels in, 24 layers, k = 32) at its 14×14 resolution.
@register("dense", kind="block", bench_shape=(256, 14, 14), test_shape=(256, 4, 4), in_channels=256, num_layers=24,
          growth_rate=32)
def dense(in_channels: int, num_layers: int, growth_rate: int) -> DenseBlock:
    """DenseNet-BC dense block: BN-ReLU-1×1(4k)-BN-ReLU-3×3(k) layers on the running concat (DenseNet-121)."""
    return init_weights(DenseBlock(in_channels, num_layers, growth_rate, bottleneck=True))


@register("dense_plain", kind="block", bench_shape=(256, 14, 14), test_shape=(256, 4, 4), in_channels=256,
          num_layers=24, growth_rate=32)
def dense_plain(in_channels: int, num_layers: int, growth_rate: int) -> DenseBlock:
    """Plain dense block: BN-ReLU-3×3(k) layers on the running concat (the seeds' DenseNet, third block)."""
    return init_weights(DenseBlock(in_channels, num_layers, growth_rate, bottleneck=False))


# DenseNet-121's first transition: 256 channels at 56×56, compressed to 128 at 28×28.
@register("transition", kind="block", bench_shape=(256, 56, 56), test_shape=(256, 8, 8), in_channels=256,
          compression=0.5)
def transition(in_channels: int, compression: float = 0.5) -> Transition:
    """DenseNet transition: BN-ReLU-1×1 conv to compression × channels (0.5), 2×2 average pool (DenseNet-121)."""
    return init_weights(Transition(in_channels, int(in_channels * compression)))


@register("densenet121", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 32, 32))
def densenet121(num_classes: int = 1000) -> DenseNet:
    """DenseNet-121 (BC, k = 32, compression 0.5), torchvision's layout and parameter count."""
    return DenseNet(32, (6, 12, 24, 16), 64, bottleneck=True, compression=0.5, num_classes=num_classes)


@register("densenet_plain", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 32, 32))
def densenet_plain(num_classes: int = 1000) -> DenseNet:
    """The seeds' DenseNet: DenseNet-121's 6-12-24-16 blocks of plain 3×3 layers, k = 32, compression 0.5.

    The seed's code omits the final BN-ReLU before pooling; a DenseNet's last features are
    pre-activation, so it is kept here as in every DenseNet of the paper.
    """
    return DenseNet(32, (6, 12, 24, 16), 64, bottleneck=False, compression=0.5, num_classes=num_classes)
