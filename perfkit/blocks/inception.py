"""GoogLeNet (Szegedy et al., *Going Deeper with Convolutions*, CVPR 2015): the Inception block and the network.

Layout: torchvision's ``googlenet``, which is the paper's Table 1 with BatchNorm after every convolution
(and so no LRN and no conv biases) and one known deviation kept for its pretrained weights: the
"5×5" branch uses a 3×3 kernel (pytorch/vision#906). It is kept here so that the parameter counts equal
torchvision's (6,624,904; 13,004,888 with the auxiliary classifiers) and the timings compare with the
googlenet that TorchBench and timm's benchmark run. With the paper's 5×5 the network has 7,005,832
parameters. The final dropout is the paper's 0.4 (torchvision: 0.2); dropout carries no parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from perfkit.blocks.layers import ConvBNReLU, init_weights
from perfkit.registry import register


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1×1; 1×1→3×3; 1×1→"5×5" (3×3, see the module
    docstring); 3×3 max pool→1×1. Arguments are the paper's Table 1 columns, in order."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int) -> None:
        super().__init__()
        self.branch1 = ConvBNReLU(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(ConvBNReLU(in_channels, ch3x3red, 1), ConvBNReLU(ch3x3red, ch3x3, 3))
        self.branch3 = nn.Sequential(ConvBNReLU(in_channels, ch5x5red, 1), ConvBNReLU(ch5x5red, ch5x5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     ConvBNReLU(in_channels, pool_proj, 1))
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: avg pool to 4×4, 1×1 conv (128), FC 1024 + ReLU, dropout 0.7, FC."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        # The paper's 5×5/3 average pool gives 4×4 at 224×224 input; adaptive pooling gives 4×4 at any size.
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = ConvBNReLU(in_channels, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.7)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


class GoogLeNetOutputs(NamedTuple):
    """What GoogLeNet returns in training mode with auxiliary classifiers: the three sets of logits."""

    logits: torch.Tensor
    aux1: torch.Tensor
    aux2: torch.Tensor


class GoogLeNet(nn.Module):
    """GoogLeNet (Inception v1). With ``aux_logits`` the two auxiliary classifiers (after 4a and 4d) run in
    training mode only and the forward returns ``GoogLeNetOutputs``; otherwise it returns the logits."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = False) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(3, 64, 7, stride=2)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = ConvBNReLU(64, 64, 1)
        self.conv3 = ConvBNReLU(64, 192, 3)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        self.aux1 = InceptionAux(512, num_classes) if aux_logits else None
        self.aux2 = InceptionAux(528, num_classes) if aux_logits else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(1024, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor | GoogLeNetOutputs:
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if aux1 is not None:
            return GoogLeNetOutputs(logits, aux1, aux2)
        return logits


# Inception (3a) at its 28×28 grid.
@register("inception", kind="block", bench_shape=(192, 28, 28), test_shape=(192, 8, 8), in_channels=192, ch1x1=64,
          ch3x3red=96, ch3x3=128, ch5x5red=16, ch5x5=32, pool_proj=32)
def inception(in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
              pool_proj: int) -> Inception:
    """GoogLeNet Inception block: 1×1 | 1×1→3×3 | 1×1→"5×5" | pool→1×1, concatenated (inception 3a)."""
    return init_weights(Inception(in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj))


@register("googlenet", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 32, 32))
def googlenet(num_classes: int = 1000, aux_logits: bool = False) -> GoogLeNet:
    """GoogLeNet / Inception v1 with BN, torchvision's layout (aux_logits=True adds the two auxiliary heads)."""
    return GoogLeNet(num_classes, aux_logits)
