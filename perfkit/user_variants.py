"""Variant atoms from outside perfkit: what :func:`perfkit.register_variant` files, and the entry points that file them.

A user atom is a transform ``transform(model, *, mode, device) -> nn.Module`` and what the harness must know
of it to measure it honestly: the dtype it computes in (its gate tolerance), whether its first call compiles
(timed as compile, never joined with another compile), the modes it supports and why it cannot run on a
device. :mod:`perfkit.variants` parses and applies the atoms; this module only keeps them, so it imports
nothing of the variants.

An installed package adds atoms through the entry-point group ``perfkit.variants``: each entry point names a
module whose import calls ``perfkit.register_variant``. They load the first time a variant name is not a
built-in (or the atoms are listed); one that fails to load is named, with its error, while the rest load.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ENTRY_POINT_GROUP = "perfkit.variants"
"""Entry-point group through which an installed package adds variant atoms: each entry point names a module
whose import calls ``perfkit.register_variant`` (``mypkg.variants``)."""

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]*")
"""A user atom's name: no ``+`` (it joins atoms), no ``,`` (it separates variants), no ``/`` (cell globs)."""

DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a user atom may declare it computes in (keys of perfkit.testing's tolerance tables)."""


@dataclass(frozen=True)
class UserVariant:
    """A registered user atom: its transform and what the measurement needs to know of it."""

    name: str
    transform: Callable[..., nn.Module]
    """``transform(model, *, mode, device) -> nn.Module``: the model (in place, or a new module)."""
    description: str
    dtype: str = "float32"
    """The dtype the transformed model computes in: the gate's tolerance and the record's ``dtype``."""
    compiles: bool = False
    """The first call compiles (``torch.compile`` with the user's options, say)."""
    modes: tuple[str, ...] = ("inference", "training")
    skip_reason: Callable[[torch.device], str | None] | None = None
    """Why the atom cannot run on a device, or None where it can."""

    def __post_init__(self) -> None:
        if not callable(self.transform):
            raise TypeError(f"variant {self.name!r}: the transform must be callable, "
                            f"got {type(self.transform).__name__}")
        try:
            inspect.signature(self.transform).bind(nn.Identity(), mode="inference", device=torch.device("cpu"))
        except TypeError as error:
            raise TypeError(f"variant {self.name!r}: the transform must accept (model, *, mode, device); "
                            f"{_qualname(self.transform)} does not ({error})") from None
        except ValueError:  # a builtin without a signature: it is called as documented, and fails there if not
            pass
        if self.dtype not in DTYPES:
            raise ValueError(f"variant {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def source(self) -> str:
        """Where the transform was defined (``module.function``)."""
        return _qualname(self.transform)

    def skip(self, device: torch.device, mode: str | None) -> str | None:
        """Why this atom cannot run in ``mode`` (when given) on ``device``, or None."""
        if mode is not None and mode not in self.modes:
            return f"{self.name} runs only in {' and '.join(self.modes)} (registered with modes={self.modes!r})"
        reason = self.skip_reason(device) if self.skip_reason is not None else None
        return f"{self.name}: {reason}" if reason else None

    def apply(self, model: nn.Module, mode: str, device: torch.device, parameters: list[nn.Parameter]) -> nn.Module:
        """The transformed model, in ``mode``'s train/eval state; a training model must keep ``parameters``."""
        result = self.transform(model, mode=mode, device=device)
        if not isinstance(result, nn.Module):
            raise TypeError(f"variant {self.name!r}: {self.source} returned {type(result).__name__}, not an nn.Module")
        # Modules the transform built start in training mode whatever the model's.
        result.train(mode == "training")
        if mode == "training":
            kept = {id(p) for p in result.parameters()}
            lost = sum(id(p) not in kept for p in parameters)
            if lost:
                # The gate compares the reference's gradients, and the optimizer steps its Parameters: a
                # model that trains others would be gated on zeros and timed training nothing it reports.
                raise ValueError(f"variant {self.name!r}: {self.source} replaced {lost} of the model's "
                                 f"{len(parameters)} Parameters; a training cell trains and gates the reference's "
                                 "own, so share them (as perfkit.fused does) or register with modes=('inference',)")
        return result


_USER_VARIANTS: dict[str, UserVariant] = {}
_PLUGIN_ERRORS: dict[str, str] = {}
_loaded = False


def _qualname(function: Callable[..., object]) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


def add_user_variant(spec: UserVariant) -> None:
    """File ``spec``; a name already filed raises ValueError naming who filed it."""
    if spec.name in _USER_VARIANTS:
        raise ValueError(f"variant {spec.name!r} is already registered (by {_USER_VARIANTS[spec.name].source})")
    _USER_VARIANTS[spec.name] = spec


def get_user_variant(name: str) -> UserVariant:
    """The user atom ``name``; an unknown one raises KeyError listing those registered."""
    try:
        return _USER_VARIANTS[name]
    except KeyError:
        raise KeyError(f"no user variant {name!r}; registered: {', '.join(sorted(_USER_VARIANTS)) or 'none'}") \
            from None


def user_variant_names() -> list[str]:
    """The registered user atoms, sorted."""
    return sorted(_USER_VARIANTS)


def variant_plugin_errors() -> dict[str, str]:
    """``{entry point (module): error}`` for each ``perfkit.variants`` entry point that failed to load."""
    load_user_variants()
    return dict(_PLUGIN_ERRORS)


def load_user_variants() -> None:
    """Load the ``perfkit.variants`` entry points, and the registry's imports, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    # The registry's loading imports $PERFKIT_IMPORT's modules and the perfkit.blocks entry points, whose
    # modules may register variants beside their blocks (a worker process has only the environment).
    from perfkit.registry import list_blocks, load_entry_points

    list_blocks()
    load_entry_points(ENTRY_POINT_GROUP, _PLUGIN_ERRORS)
