"""The ``triton`` variant: swap fused-kernel modules into a reference model, sharing its parameters.

Each fused module is built ``from_reference`` and holds the very same Parameters and buffers as the
module it replaces, so a swapped model trains the same weights and the correctness gate compares like
with like. Kernels are imported only when a swap is asked for: ``import perfkit`` needs no triton.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from perfkit.blocks.densenet import DenseBlock
from perfkit.blocks.layers import ResidualEpilogue

FUSED_FOR = {
    ResidualEpilogue: ("perfkit.fused.wrc", "FusedResidualEpilogue"),
    DenseBlock: ("perfkit.fused.dense", "FusedDenseBlock"),
}
"""Reference module type -> (module, class) of its fused replacement."""

SUPPORTED = ("supported: " + ", ".join(t.__name__ for t in FUSED_FOR)
             + ", and relu(bn(y) + s) or relu(bn(cat(...))) with an affine BatchNorm2d, found by torch.fx in any "
             "module's code")
"""What the ``triton`` variant fuses, for error messages."""


def fusable_modules(model: nn.Module) -> list[str]:
    """Qualified names of the submodules (or the model itself, as "") the ``triton`` variant replaces."""
    names = []
    for name, module in model.named_modules():
        if type(module) in FUSED_FOR and not any(name.startswith(n + ".") or n == "" for n in names):
            names.append(name)
    return names


@dataclass(frozen=True)
class Fusion:
    """What :func:`fuse` did to a model: the model (or its replacement) and the fused modules it now runs."""

    model: nn.Module
    kinds: dict[str, int]
    """Fused module class -> how many the model runs (``{"FusedResidualEpilogue": 8}`` for a ResNet-18)."""

    @property
    def count(self) -> int:
        """How many fused modules the model runs."""
        return sum(self.kinds.values())


def fused_kinds(model: nn.Module) -> dict[str, int]:
    """Fused module class name -> how many of them ``model`` runs, sorted by name."""
    from perfkit.fused.dense import FusedBatchNormReLU, FusedDenseBlock
    from perfkit.fused.wrc import FusedResidualEpilogue

    fused_types = (FusedResidualEpilogue, FusedDenseBlock, FusedBatchNormReLU)
    counts = Counter(type(m).__name__ for m in model.modules() if isinstance(m, fused_types))
    return dict(sorted(counts.items()))


def fuse(model: nn.Module) -> Fusion:
    """Replace every fusable part of ``model`` in place; the result says what was fused.

    Two passes: the class swap above for perfkit's own blocks (the fast path), then fusion by pattern
    (:mod:`perfkit.fused.pattern`: ``relu(bn(y) + s)`` and ``relu(bn(cat(...)))`` found by ``torch.fx``
    in any module's code, a torchvision- or timm-style ResNet's or DenseNet's included). Parameters and
    buffers stay shared with ``model``. Raises ValueError naming what is supported if nothing in ``model``
    has a fused kernel.
    """
    import importlib

    from perfkit.fused.pattern import fuse_patterns

    names = fusable_modules(model)
    for name in names:
        reference = model.get_submodule(name)
        module_name, class_name = FUSED_FOR[type(reference)]
        fused = getattr(importlib.import_module(module_name), class_name).from_reference(reference)
        # A fresh module starts in training mode. Set only its own flag: .train() would recurse into the
        # shared submodules and unfreeze a BatchNorm deliberately left in eval mode.
        fused.training = reference.training
        if name == "":
            return Fusion(fused, fused_kinds(fused))
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, fused)
    model, fused_by_pattern = fuse_patterns(model)
    if not names and not fused_by_pattern:
        raise ValueError(f"{type(model).__name__} has no module with a fused Triton kernel ({SUPPORTED})")
    return Fusion(model, fused_kinds(model))


def to_triton(model: nn.Module) -> nn.Module:
    """Replace every fusable part of ``model`` in place; returns the model (or its replacement).

    :func:`fuse` without the account of what was fused.
    """
    return fuse(model).model
