"""``FusedDenseBlock``: the ``triton`` variant's stand-in for ``perfkit.blocks.densenet.DenseBlock``.

It shares the reference block's layers (the same modules, Parameters and buffers) and runs them through
``perfkit.kernels.dense.dense_block``: one preallocated buffer instead of a concat per layer, a fused
BN+ReLU kernel on each channel prefix, and a backward that recomputes the normalized prefixes instead of
keeping them, so training memory grows linearly in depth. The kernels module (and so triton) is imported
on the first forward, not with this module.
"""

from __future__ import annotations

import torch
from torch import nn

from perfkit.blocks.densenet import DenseBlock, DenseLayer


def _check_conv(conv: nn.Conv2d, where: str) -> None:
    """The fused block assumes what a dense layer's convolutions are: stride 1, 'same' padding, no bias."""
    same = tuple(k // 2 for k in conv.kernel_size)
    if (conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.bias is not None
            or conv.padding_mode != "zeros" or conv.padding != same or any(k % 2 == 0 for k in conv.kernel_size)):
        raise ValueError(f"{where}: FusedDenseBlock needs an odd-kernel convolution with stride 1, dilation 1, "
                         f"groups 1, zero padding {same} and no bias; got {conv}")


def _check_norm(norm: nn.BatchNorm2d, where: str) -> None:
    if not isinstance(norm, nn.BatchNorm2d) or not norm.affine:
        raise ValueError(f"{where}: FusedDenseBlock needs an affine nn.BatchNorm2d; got {norm}")


class FusedDenseBlock(nn.Module):
    """A dense block computed in one buffer with fused BN+ReLU kernels; same results as ``DenseBlock``."""

    def __init__(self, layers: nn.ModuleList, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.layers = layers
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        for index, layer in enumerate(layers):
            where = f"layers[{index}]"
            if not isinstance(layer, DenseLayer):
                raise TypeError(f"{where} must be a perfkit DenseLayer; got {type(layer).__name__}")
            _check_norm(layer.norm1, f"{where}.norm1")
            _check_conv(layer.conv1, f"{where}.conv1")
            if layer.bottleneck:
                _check_norm(layer.norm2, f"{where}.norm2")
                _check_conv(layer.conv2, f"{where}.conv2")

    @classmethod
    def from_reference(cls, ref: DenseBlock) -> FusedDenseBlock:
        """Wrap ``ref``'s layers (shared, not copied, in ``ref``'s train/eval mode): training one trains the other.

        As in the reference, each BatchNorm's own ``training`` flag picks batch or running statistics, so a
        BatchNorm frozen in eval mode inside a training model stays frozen.
        """
        fused = cls(ref.layers, ref.in_channels, ref.growth_rate)
        # Only this module's own flag: .train(mode) would recurse into the shared layers and unfreeze them.
        fused.training = ref.training
        return fused

    @property
    def out_channels(self) -> int:
        """Channels of the block's output: the input's plus ``growth_rate`` per layer."""
        return self.in_channels + len(self.layers) * self.growth_rate

    def _norm_state(self, norm: nn.BatchNorm2d):
        """nn.BatchNorm2d.forward's bookkeeping: count the batch, resolve momentum=None to a running average."""
        from perfkit.kernels.dense import NormState

        momentum = 0.0 if norm.momentum is None else norm.momentum
        if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            if norm.momentum is None:
                momentum = 1.0 / float(norm.num_batches_tracked)
        # nn.BatchNorm2d passes its buffers only when `not training or track_running_stats`: a training
        # BatchNorm that does not track statistics normalizes with the batch's and leaves the buffers alone.
        pass_running = not norm.training or norm.track_running_stats
        return NormState(norm.training, norm.running_mean if pass_running else None,
                         norm.running_var if pass_running else None, momentum, norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``cat(x, f_0(x), f_1(...), ...)`` through :func:`perfkit.kernels.dense.dense_block`."""
        from perfkit.kernels.dense import dense_block

        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels; got input of shape {tuple(x.shape)}")
        return dense_block(x, self.layer_tensors())

    def layer_tensors(self) -> list:
        """The layers as ``perfkit.kernels.dense.DenseLayerTensors`` for one call (counts the batch in training)."""
        from perfkit.kernels.dense import DenseLayerTensors

        layers = []
        for layer in self.layers:
            bottleneck = (dict(norm2_weight=layer.norm2.weight, norm2_bias=layer.norm2.bias,
                               norm2=self._norm_state(layer.norm2), conv2_weight=layer.conv2.weight)
                          if layer.bottleneck else {})
            layers.append(DenseLayerTensors(layer.norm1.weight, layer.norm1.bias, self._norm_state(layer.norm1),
                                            layer.conv1.weight, **bottleneck))
        return layers


class FusedBatchNormReLU(nn.Module):
    """``relu(bn(x))`` in one fused kernel (``perfkit.kernels.bn_relu.bn_relu``), sharing ``bn``'s module.

    What fusion by pattern puts after a DenseNet-style concat. It follows ``nn.BatchNorm2d.forward``: batch
    statistics in training or without running statistics, the counter and running statistics updated only
    in training with ``track_running_stats``.
    """

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        _check_norm(bn, "bn")
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn(x))`` with ``bn``'s mode, statistics and counter, as ``nn.BatchNorm2d.forward`` uses them."""
        from perfkit.kernels.bn_relu import bn_relu

        bn = self.bn
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        pass_running = not bn.training or bn.track_running_stats
        return bn_relu(x, bn.weight, bn.bias, bn.running_mean if pass_running else None,
                       bn.running_var if pass_running else None, training=use_batch_stats, momentum=momentum,
                       eps=bn.eps)
