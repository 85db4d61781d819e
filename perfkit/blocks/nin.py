"""Network in Network (Lin, Chen & Yan, ICLR 2014): the mlpconv block and the ImageNet NiN.

The ImageNet network is the authors' released model (the Caffe Model Zoo's NiN, whose layout d2l also
follows): four mlpconv blocks, each a k×k convolution and two 1×1 convolutions with ReLU after each,
3×3/2 max pooling between them (ceil mode, as in Caffe), dropout 0.5 before the last block, whose last
1×1 convolution has one channel per class, and global average pooling instead of FC layers. There is no
BatchNorm (2013), so the convolutions keep their biases. 7,595,176 parameters. The seed put BN, ReLU
and dropout after the class-score layer too; here only the ReLU (which the released model has) follows it.
"""

from __future__ import annotations

import torch
from torch import nn

from perfkit.blocks.layers import init_weights
from perfkit.registry import register


class MLPConv(nn.Sequential):
    """mlpconv: k×k conv → ReLU → 1×1 conv → ReLU → 1×1 conv → ReLU; ``widths`` are the three layers' widths."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int], kernel_size: int, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__(
            nn.Conv2d(in_channels, widths[0], kernel_size, stride=stride, padding=padding), nn.ReLU(inplace=True),
            nn.Conv2d(widths[0], widths[1], kernel_size=1), nn.ReLU(inplace=True),
            nn.Conv2d(widths[1], widths[2], kernel_size=1), nn.ReLU(inplace=True),
        )


class NiN(nn.Module):
    """The ImageNet NiN: mlpconv(96, 11×11/4), mlpconv(256, 5×5), mlpconv(384, 3×3), mlpconv(1024, 3×3 → classes)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            MLPConv(3, (96, 96, 96), 11, stride=4), nn.MaxPool2d(3, stride=2, ceil_mode=True),
            MLPConv(96, (256, 256, 256), 5, padding=2), nn.MaxPool2d(3, stride=2, ceil_mode=True),
            MLPConv(256, (384, 384, 384), 3, padding=1), nn.MaxPool2d(3, stride=2, ceil_mode=True),
            nn.Dropout(0.5),
            MLPConv(384, (1024, 1024, num_classes), 3, padding=1),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


# NiN's second mlpconv block (5×5, 96 → 256) at its 27×27 input.
@register("nin", kind="block", bench_shape=(96, 27, 27), test_shape=(96, 8, 8), in_channels=96,
          widths=(256, 256, 256), kernel_size=5, padding=2)
def nin(in_channels: int, widths: tuple[int, int, int], kernel_size: int, stride: int = 1,
        padding: int = 0) -> MLPConv:
    """NiN mlpconv block: k×k conv and two 1×1 convs, ReLU after each (NiN block 2)."""
    return init_weights(MLPConv(in_channels, widths, kernel_size, stride, padding))


@register("nin_net", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 64, 64))
def nin_net(num_classes: int = 1000) -> NiN:
    """Network in Network for ImageNet, the authors' released layout (global average pooling, no FC)."""
    return NiN(num_classes)
