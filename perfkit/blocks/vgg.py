"""VGG (Simonyan & Zisserman, ICLR 2015): the VGG block and VGG-11/13/16/19, with and without BatchNorm.

torchvision's layout: a 7×7 adaptive average pool before the classifier (so small inputs work; at 224×224
it is the identity) and, in the BN variants, the convolutions keep their biases. That bias is redundant
under BatchNorm, but it is part of torchvision's published parameter counts and weights (the BN variants
are torchvision's, not the paper's), so it stays: vgg11_bn has 132,868,840 parameters, not 2,752 fewer.
"""

from __future__ import annotations

import torch
from torch import nn

from perfkit.blocks.layers import init_weights
from perfkit.registry import register

# Output channels of each block's 3×3 convolutions, configurations A, B, D, E of the paper's Table 1.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGGBlock(nn.Sequential):
    """``num_convs`` × (3×3 conv [+ BN] + ReLU), then 2×2 max pool, stride 2."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, batch_norm: bool = False) -> None:
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers.append(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        super().__init__(*layers)


class VGG(nn.Module):
    """VGG: five VGG blocks, 7×7 adaptive average pool, FC 4096-ReLU-dropout, FC 4096-ReLU-dropout, FC."""

    def __init__(self, config: tuple[tuple[int, ...], ...], batch_norm: bool = False, num_classes: int = 1000) -> None:
        super().__init__()
        blocks, in_channels = [], 3
        for widths in config:
            blocks.append(VGGBlock(in_channels, widths[0], len(widths), batch_norm))
            in_channels = widths[0]
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# VGG-16's third block (three 3×3 convolutions, 128 → 256 channels) at its 56×56 input.
@register("vgg", kind="block", bench_shape=(128, 56, 56), test_shape=(128, 8, 8), in_channels=128, out_channels=256,
          num_convs=3)
def vgg(in_channels: int, out_channels: int, num_convs: int, batch_norm: bool = False) -> VGGBlock:
    """VGG block: n × (3×3 conv [+ BN] + ReLU), 2×2 max pool (VGG-16 block 3)."""
    return init_weights(VGGBlock(in_channels, out_channels, num_convs, batch_norm))


# The paper's Table 1 names the configurations by letter.
_TABLE1_COLUMN = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}

for _name, _config in CONFIGS.items():
    for _batch_norm in (False, True):
        register(f"{_name}_bn" if _batch_norm else _name, kind="network", bench_shape=(3, 224, 224),
                 test_shape=(3, 32, 32),
                 description=f"VGG-{_name[3:]}{' with BatchNorm' if _batch_norm else ''} (configuration "
                             f"{_TABLE1_COLUMN[_name]}), torchvision's layout and parameter count",
                 config=_config, batch_norm=_batch_norm)(VGG)
