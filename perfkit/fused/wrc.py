"""``FusedResidualEpilogue``: the ``triton`` variant's drop-in for ``perfkit.blocks.layers.ResidualEpilogue``."""

from __future__ import annotations

import torch
from torch import nn

from perfkit.blocks.layers import ResidualEpilogue


class FusedResidualEpilogue(nn.Module):
    """``relu(alpha * bn(y) + beta * s)`` in the fused Triton kernels of ``perfkit.kernels.wrc``.

    It holds the very ``bn`` module and ``alpha``/``beta`` tensors of the ``ResidualEpilogue`` it replaces
    (same Parameter and buffer objects), so an optimizer, a state_dict and the running statistics carry over.
    """

    def __init__(self, bn: nn.BatchNorm2d, alpha: torch.Tensor, beta: torch.Tensor) -> None:
        super().__init__()
        # Imported here, not at module top: importing perfkit.fused must work without triton; building the
        # fused module is the point where the kernels are asked for.
        from perfkit.kernels.wrc import wrc_epilogue

        if not bn.affine:
            raise ValueError("FusedResidualEpilogue needs an affine BatchNorm2d (weight and bias); got affine=False")
        self._wrc_epilogue = wrc_epilogue
        self.bn = bn
        for name, value in (("alpha", alpha), ("beta", beta)):
            if isinstance(value, nn.Parameter):
                setattr(self, name, value)
            else:
                self.register_buffer(name, value)

    @classmethod
    def from_reference(cls, ref: ResidualEpilogue) -> FusedResidualEpilogue:
        """The fused epilogue sharing ``ref``'s BatchNorm module, ``alpha`` and ``beta``."""
        return cls(ref.bn, ref.alpha, ref.beta)

    def forward(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``relu(alpha * bn(y) + beta * s)``, ``bn``'s statistics used and updated as nn.BatchNorm2d would."""
        bn = self.bn
        # The same decisions as nn.BatchNorm2d.forward: batch statistics in training or when no running
        # statistics are tracked; running statistics read in eval, updated (and the counter bumped) in training.
        use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        pass_running = not bn.training or bn.track_running_stats
        counter = bn.num_batches_tracked if bn.training and bn.track_running_stats else None
        return self._wrc_epilogue(
            y, s, bn.weight, bn.bias,
            bn.running_mean if pass_running else None, bn.running_var if pass_running else None,
            self.alpha, self.beta,
            training=use_batch_stats, momentum=bn.momentum, eps=bn.eps, num_batches_tracked=counter,
        )

    def extra_repr(self) -> str:
        """alpha, beta and whether they are learnable, for ``print(model)``."""
        kind = "learnable" if isinstance(self.alpha, nn.Parameter) else "fixed"
        return f"alpha={self.alpha.item():g}, beta={self.beta.item():g}, {kind}"

