"""DenseNet (Huang et al., 2017): the dense block, the transition, and the networks built from them."""

from __future__ import annotations

import torch
from torch import nn

from perfkit.blocks.layers import conv1x1, conv3x3


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
