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
