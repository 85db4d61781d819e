"""Two residual variants from the seeds, in their published forms: post-addition BN and multi-scale fusion."""

from __future__ import annotations

import torch
from torch import nn

from perfkit.blocks.layers import ConvBNReLU, ResidualEpilogue, conv1x1, conv3x3, init_weights
from perfkit.blocks.resnet import make_shortcut
from perfkit.registry import register


class ResNormBlock(nn.Module):
    """Residual normalization, BN after the addition: ``relu(bn(conv2(relu(bn1(conv1(x)))) + shortcut(x)))``.

    This is "BN after addition", Fig. 4(b) of He et al., *Identity Mappings in Deep Residual Networks*
    (ECCV 2016): the basic block with its last BatchNorm moved from the residual branch to the sum, the
    CNN form of the Transformer's Post-Norm ``LN(x + F(x))``. He et al. found it trains worse than the
    original block (the BN on the sum alters the identity signal), which is what makes it a useful
    reference. The seed's ``out += bn(out - identity)`` normalizes a difference nobody proposed.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut = make_shortcut(in_channels, out_channels, stride)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.relu(self.bn1(self.conv1(x))))
        return torch.relu(self.bn(y + self.shortcut(x)))


class FusionBlock(nn.Module):
    """Multi-scale feature fusion: parallel branches of 1×1, 3×3 and 5×5 receptive field, concatenated,
    fused by a 1×1 convolution and added to the identity: ``relu(bn(conv1x1(cat(b1, b3, b5))) + x)``.

    This is the Inception-ResNet-A block (Szegedy et al., *Inception-v4, Inception-ResNet and the Impact
    of Residual Connections on Learning*, AAAI 2017, Fig. 10): 1×1; 1×1→3×3; 1×1→3×3→3×3 (a factorized
    5×5), each ``branch_channels`` wide, and the "linear" 1×1 that maps the concat back to ``channels``.
    Only the identity shortcut exists (the block keeps its shape), and it ends with the shared
    ``ResidualEpilogue`` (alpha = beta = 1), so the fused epilogue kernel applies to it as well. The seed
    concatenated the residual with the identity instead: that fuses two views at one scale, not several.
    """

    def __init__(self, channels: int, branch_channels: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBNReLU(channels, branch_channels, 1)
        self.branch3x3 = nn.Sequential(ConvBNReLU(channels, branch_channels, 1),
                                       ConvBNReLU(branch_channels, branch_channels, 3))
        self.branch5x5 = nn.Sequential(ConvBNReLU(channels, branch_channels, 1),
                                       ConvBNReLU(branch_channels, branch_channels, 3),
                                       ConvBNReLU(branch_channels, branch_channels, 3))
        self.fuse = conv1x1(3 * branch_channels, channels)
        self.epilogue = ResidualEpilogue(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = torch.cat([self.branch1x1(x), self.branch3x3(x), self.branch5x5(x)], dim=1)
        return self.epilogue(self.fuse(branches), x)


@register("resnorm", kind="block", bench_shape=(64, 56, 56), test_shape=(64, 8, 8), in_channels=64, out_channels=64)
def resnorm(in_channels: int, out_channels: int, stride: int = 1) -> ResNormBlock:
    """Residual normalization: BN after the addition, relu(bn(F(x) + x)) (He et al. 2016, Fig. 4b)."""
    return init_weights(ResNormBlock(in_channels, out_channels, stride))


# Inception-ResNet-v1's 35×35 grid: 256 channels, 32-wide branches.
@register("fusion", kind="block", bench_shape=(256, 35, 35), test_shape=(256, 8, 8), channels=256, branch_channels=32)
def fusion(channels: int, branch_channels: int) -> FusionBlock:
    """Multi-scale fusion: 1×1/3×3/5×5 branches, concat, 1×1 conv, + identity (Inception-ResNet-A)."""
    return init_weights(FusionBlock(channels, branch_channels))
