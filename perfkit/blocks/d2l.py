"""The small 1-channel ResNet-18 and DenseNet of *Dive into Deep Learning* (Fashion-MNIST, 10 classes).

Flat ``nn.Sequential`` networks whose child names are those of the d2l seed, so the seed's layer-by-layer
shape tables (``for name, layer in net.named_children()``) can be checked as they are printed there.
Two corrections to the seed's code, neither changing a shape: convolutions followed by BatchNorm have no
bias, and ResNet's 1×1 projection shortcut has its BatchNorm (the paper's option B, as in torchvision),
so every block is the shared ``BasicBlock``. The seed's misspelt ``DenseBlosk_i`` is ``dense_block_i``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from perfkit.blocks.densenet import DenseBlock, Transition
from perfkit.blocks.layers import init_weights
from perfkit.blocks.resnet import BasicBlock
from perfkit.registry import register


def _stem() -> list[tuple[str, nn.Module]]:
    # d2l's stem, named "0".."3" as nn.Sequential numbers it: 7×7/2 conv, BN, ReLU, 3×3/2 max pool.
    return [("0", nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)), ("1", nn.BatchNorm2d(64)),
            ("2", nn.ReLU()), ("3", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]


def resnet_block(in_channels: int, out_channels: int, num_residuals: int, first_block: bool = False) -> nn.Sequential:
    """d2l's ``resnet_block``: ``num_residuals`` basic blocks, the first halving the resolution unless
    ``first_block`` (which follows the stem's max pool and keeps the channels)."""
    blocks = [BasicBlock(in_channels if i == 0 else out_channels, out_channels, 2 if i == 0 and not first_block else 1)
              for i in range(num_residuals)]
    return nn.Sequential(*blocks)


@register("d2l_resnet18", kind="network", bench_shape=(1, 224, 224), test_shape=(1, 32, 32))
def d2l_resnet18(num_classes: int = 10) -> nn.Sequential:
    """d2l's ResNet-18 for 1-channel inputs (Fashion-MNIST), 10 classes, the seed's shape table."""
    net = nn.Sequential(OrderedDict([
        *_stem(),
        ("resnet_block1", resnet_block(64, 64, 2, first_block=True)),
        ("resnet_block2", resnet_block(64, 128, 2)),
        ("resnet_block3", resnet_block(128, 256, 2)),
        ("resnet_block4", resnet_block(256, 512, 2)),
        ("global_avg_pool", nn.AdaptiveAvgPool2d(1)),
        ("fc", nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes))),
    ]))
    return init_weights(net)


@register("d2l_densenet", kind="network", bench_shape=(1, 96, 96), test_shape=(1, 32, 32))
def d2l_densenet(num_classes: int = 10) -> nn.Sequential:
    """d2l's DenseNet: four plain dense blocks of 4 layers, k = 32, halving transitions; 1 channel, 10 classes."""
    layers, channels = _stem(), 64
    for i in range(4):
        block = DenseBlock(channels, num_layers=4, growth_rate=32, bottleneck=False)
        layers.append((f"dense_block_{i}", block))
        channels = block.out_channels
        if i != 3:
            layers.append((f"transition_block_{i}", Transition(channels, channels // 2)))
            channels //= 2
    layers += [("BN", nn.BatchNorm2d(channels)), ("relu", nn.ReLU()), ("global_avg_pool", nn.AdaptiveAvgPool2d(1)),
               ("fc", nn.Sequential(nn.Flatten(), nn.Linear(channels, num_classes)))]
    return init_weights(nn.Sequential(OrderedDict(layers)))
