"""Small helpers with the papers' names, shared by every block (torchvision's ``conv3x3``, ``conv1x1``)."""

from __future__ import annotations

import torch
from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3×3 convolution with padding 1 and no bias (a BatchNorm follows it)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1×1 convolution with no bias (a BatchNorm follows it)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class ResidualEpilogue(nn.Module):
    """``relu(alpha * bn(y) + beta * s)``: the end of every residual block.

    ``y`` is the residual branch's last convolution output and ``s`` the shortcut. ``alpha = beta = 1`` is
    ResNet's epilogue; learnable ``alpha`` and ``beta`` make the weighted residual connection (WRC); a
    constant ``alpha < 1`` is residual scaling. Keeping the epilogue one module lets the ``triton``
    variant swap in a fused kernel (``perfkit.kernels.wrc``) for all of them at once.
    """

    def __init__(self, channels: int, alpha: float = 1.0, beta: float = 1.0, learnable: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        if learnable:
            self.alpha = nn.Parameter(torch.tensor(float(alpha)))
            self.beta = nn.Parameter(torch.tensor(float(beta)))
        else:
            # Buffers, not Python floats, so that .to(dtype) and the fused kernel see one representation.
            self.register_buffer("alpha", torch.tensor(float(alpha)))
            self.register_buffer("beta", torch.tensor(float(beta)))

    def forward(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.alpha * self.bn(y) + self.beta * s)

    def extra_repr(self) -> str:
        kind = "learnable" if isinstance(self.alpha, nn.Parameter) else "fixed"
        return f"alpha={self.alpha.item():g}, beta={self.beta.item():g}, {kind}"


class ConvBNReLU(nn.Sequential):
    """``conv (no bias) → BatchNorm → ReLU``: torchvision's ``BasicConv2d``, timm's ``ConvNormAct``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2 if padding is None else padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)


def init_weights(module: nn.Module) -> nn.Module:
    """torchvision's initialization, in place; returns ``module``.

    Convolutions: Kaiming normal, fan-out, ReLU gain (He et al. 2015), biases zero. BatchNorm: weight 1,
    bias 0. Linear: N(0, 0.01), bias 0 (torchvision's VGG and AlexNet-style heads). Learnable residual
    weights (``ResidualEpilogue.alpha``/``beta``) are left at their constructor values.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return module
