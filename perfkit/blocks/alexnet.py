"""AlexNet (Krizhevsky, Sutskever & Hinton, NeurIPS 2012) in the paper's 96-256-384-384-256 layout.

One tower, no grouped convolutions: the paper split conv2, conv4 and conv5 across two GPUs (groups of 2),
a memory workaround of 2012 that no current implementation keeps; ungrouped, the network has 62,378,344
parameters (grouped, 60,965,224 — the paper's "60 million"). As in the paper: ReLU, local response
normalization after conv1 and conv2 (n = 5, alpha = 1e-4, beta = 0.75, k = 2), overlapping 3×3/2 max
pooling, dropout 0.5 on the two hidden FC layers. Two choices from torchvision: conv1 pads by 2, so a
224×224 input gives the paper's 55×55 (its stated 224 only works as 227 unpadded), and a 6×6 adaptive
average pool before the classifier lets small test inputs through (at 224×224 it is the identity).
torchvision's ``alexnet`` is the 64-192-384-256-256 "one weird trick" variant (61,100,840 parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from perfkit.blocks.layers import init_weights
from perfkit.registry import register


class AlexNet(nn.Module):
    """AlexNet, paper layout: five convolutions (96, 256, 384, 384, 256), three FC layers (4096, 4096, classes)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0), nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0), nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register("alexnet", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 64, 64))
def alexnet(num_classes: int = 1000) -> AlexNet:
    """AlexNet, the paper's 96-256-384-384-256 single-tower layout with LRN (62.4M parameters)."""
    return AlexNet(num_classes)
