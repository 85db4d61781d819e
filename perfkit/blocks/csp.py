"""Cross Stage Partial networks (Wang et al., *CSPNet*, CVPR Workshops 2020): the CSP stage and CSP-ResNet-50.

The layout is timm's ``cspresnet50`` (``CrossStage`` with ``expand_ratio=2``, ``bottle_ratio=0.5``,
``cross_linear=True``, stage depths 3-3-5-2, a 3×3/2 down-sampling conv opening stages 2-4): 21,616,168
parameters, timm's published 21.6M (the test recounts it from that layout in closed form). One
difference: timm's cfg uses LeakyReLU (from the authors' darknet cfg); here every activation is ReLU, as
in ResNet-50, so that CSP-ResNet-50 against ResNet-50 measures the cross-stage structure alone and its
bottlenecks end with the same ``ResidualEpilogue``. Activations carry no parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from perfkit.blocks.layers import ConvBNReLU, conv1x1, init_weights
from perfkit.blocks.resnet import Bottleneck
from perfkit.registry import register


class CSPStage(nn.Module):
    """One cross stage partial stage: split the channels, run one part through ``depth`` residual
    bottlenecks, concatenate with the other part, and fuse with a 1×1 transition.

    ``x → [3×3/stride down] → 1×1 expand to 2·out (linear) → split (part A | part B)``;
    part B goes through the bottlenecks (``out → out/2 → out``, identity shortcut) and a 1×1 partial
    transition; ``cat(A, B)`` goes through the final 1×1 transition to ``out_channels``. The one linear
    1×1 expansion followed by a split is the same map as YOLOv5's C3 two linear 1×1 convolutions, one
    per part, computed as one GEMM.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int, stride: int = 1) -> None:
        super().__init__()
        self.conv_down = ConvBNReLU(in_channels, in_channels, 3, stride) if stride != 1 else nn.Identity()
        # cross_linear: the expansion has no activation, each part starts from a linear projection.
        self.conv_exp = nn.Sequential(conv1x1(in_channels, 2 * out_channels), nn.BatchNorm2d(2 * out_channels))
        self.blocks = nn.Sequential(*(Bottleneck(out_channels, out_channels // 2, out_channels=out_channels)
                                      for _ in range(depth)))
        self.conv_transition_b = ConvBNReLU(out_channels, out_channels, 1)
        self.conv_transition = ConvBNReLU(2 * out_channels, out_channels, 1)
        self.part_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cross, part = self.conv_exp(self.conv_down(x)).split(self.part_channels, dim=1)
        part = self.conv_transition_b(self.blocks(part))
        return self.conv_transition(torch.cat([cross, part], dim=1))


class CSPResNet(nn.Module):
    """CSP-ResNet: ResNet's 7×7/2 stem and max pool, four CSP stages, global average pool, FC."""

    def __init__(self, depths: tuple[int, int, int, int], widths: tuple[int, int, int, int],
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBNReLU(3, 64, 7, stride=2), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        stages, in_channels = [], 64
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            # The first stage follows the stem's max pool and keeps the resolution, as ResNet's layer1 does.
            stages.append(CSPStage(in_channels, width, depth, stride=1 if i == 0 else 2))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# CSP-ResNet-50's first stage, at ResNet-50 layer1's resolution.
@register("csp", kind="block", bench_shape=(64, 56, 56), test_shape=(64, 8, 8), in_channels=64, out_channels=128,
          depth=3)
def csp(in_channels: int, out_channels: int, depth: int, stride: int = 1) -> CSPStage:
    """Cross stage partial stage: split, n bottlenecks on one part, concat, 1×1 transition (CSPNet)."""
    return init_weights(CSPStage(in_channels, out_channels, depth, stride))


@register("csp_resnet50", kind="network", bench_shape=(3, 224, 224), test_shape=(3, 32, 32))
def csp_resnet50(num_classes: int = 1000) -> CSPResNet:
    """CSP-ResNet-50: ResNet-50's stages as CSP stages, timm's cspresnet50 layout (ReLU)."""
    return CSPResNet((3, 3, 5, 2), (128, 256, 512, 1024), num_classes)
