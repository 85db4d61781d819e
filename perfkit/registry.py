"""One registry for every block and network: ``register``, ``create``, ``list_blocks``.

Modelled on timm's ``register_model`` / ``create_model`` / ``list_models``: every entry is reachable by
name, construction takes keyword overrides, and a wrong name lists the right ones.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from torch import nn

import perfkit.zoo as zoo

KINDS = ("block", "network")


@dataclass(frozen=True)
class Entry:
    """A registered block or network and the input shapes it is measured and tested at."""

    name: str
    kind: str
    factory: Callable[..., nn.Module]
    bench_shape: tuple[int, ...]
    """Per-sample input shape (C, H, W) at the benchmark size: a block at a representative stage."""
    test_shape: tuple[int, ...]
    """Per-sample input shape small enough for forward and backward on a 2-core CPU in well under a second."""
    description: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments the factory is called with before the caller's overrides."""

    def create(self, **overrides: Any) -> nn.Module:
        """Build the module with the entry's keyword arguments updated by ``overrides``."""
        return self.factory(**{**self.kwargs, **overrides})

    def example_input(self, batch: int, *, bench: bool = False, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """A random input batch of this entry's test (or benchmark) shape."""
        shape = self.bench_shape if bench else self.test_shape
        return torch.randn((batch, *shape), dtype=dtype, generator=generator).to(device)


_REGISTRY: dict[str, Entry] = {}


def register(name: str, *, kind: str, bench_shape: tuple[int, ...], test_shape: tuple[int, ...],
             description: str = "", **kwargs: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory`` under ``name``; ``kwargs`` are passed to it on creation.

    The same factory may be registered under several names with different ``kwargs`` (``resnet18`` and
    ``resnet34`` are one ``resnet`` factory) by stacking decorators.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} for {name!r} is not one of {KINDS}")
    if zoo.is_zoo_name(name):
        raise ValueError(f"{name!r}: the prefixes {', '.join(p + ':' for p in zoo.LIBRARIES)} name the model "
                         "libraries' own models (docs/zoo.md); register it under a name without one")

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"{name!r} is already registered (by {_REGISTRY[name].factory.__qualname__})")
        doc = description or next(iter((factory.__doc__ or "").strip().splitlines()), "")
        _REGISTRY[name] = Entry(name, kind, factory, tuple(bench_shape), tuple(test_shape), doc, dict(kwargs))
        return factory

    return decorator


ENTRY_POINT_GROUP = "perfkit.blocks"
"""Entry-point group through which an installed package adds entries: each entry point names a module
whose import runs its ``@perfkit.register(...)`` decorators (``mypkg.blocks``)."""

IMPORT_ENV = "PERFKIT_IMPORT"
"""Comma-separated modules imported with the built-in blocks, for every command (``--import``/``--perfkit-import``
set it)."""

_loaded = False
_PLUGIN_ERRORS: dict[str, str] = {}


def plugin_errors() -> dict[str, str]:
    """``{entry point or module: error}`` for each ``perfkit.blocks`` entry point that failed to load."""
    _load()
    return dict(_PLUGIN_ERRORS)


def import_modules(modules: str | list[str]) -> list[str]:
    """Import modules whose ``@perfkit.register`` calls add entries; returns the names they added.

    ``modules`` is a list or a comma-separated string (``"mypkg.blocks,other.nets"``). A module that cannot
    be imported raises ImportError naming it and its error: it was asked for by name.
    """
    _load()
    names = [m.strip() for m in (modules.split(",") if isinstance(modules, str) else modules) if m.strip()]
    before = set(_REGISTRY)
    for module in names:
        try:
            importlib.import_module(module)
        except Exception as error:
            raise ImportError(f"cannot import {module!r} to register its blocks: {type(error).__name__}: {error}") \
                from error
    return sorted(set(_REGISTRY) - before)


def load_entry_points(group: str, errors: dict[str, str]) -> None:
    """Import every module of the entry-point ``group``. One broken package must not take the others, or the
    built-in entries, down with it: its error is kept in ``errors`` under its name and reported (pytest's header
    and a warning, the CLI's stderr)."""
    for entry_point in metadata.entry_points(group=group):
        try:
            entry_point.load()
        except Exception as error:
            errors[f"{entry_point.name} ({entry_point.value})"] = f"{type(error).__name__}: {error}"
            warnings.warn(f"perfkit: the {group} entry point {entry_point.name!r} ({entry_point.value}) failed to "
                          f"load: {type(error).__name__}: {error}", stacklevel=3)


def _load() -> None:
    """Import the built-in blocks, the ``perfkit.blocks`` entry points and ``$PERFKIT_IMPORT``, once."""
    global _loaded
    if _loaded:
        return
    # Importing the block modules runs their @register decorators; done on first use, not at import.
    import perfkit.blocks  # noqa: F401

    # Set before the plugins load: import_modules calls back here.
    _loaded = True

    load_entry_points(ENTRY_POINT_GROUP, _PLUGIN_ERRORS)
    if os.environ.get(IMPORT_ENV):
        import_modules(os.environ[IMPORT_ENV])


_ZOO_ENTRIES: dict[str, Entry] = {}
"""``tv:``/``timm:`` entries resolved so far: resolving builds the model on meta and probes its test shape."""


def _zoo_entry(name: str) -> Entry:
    """The entry of a torchvision or timm model (``tv:resnet50``), resolved on first use (perfkit/zoo.py)."""
    if name not in _ZOO_ENTRIES:
        model = zoo.resolve(name)
        _ZOO_ENTRIES[name] = Entry(name, "network", model.factory, model.bench_shape, model.test_shape,
                                   model.description, model.kwargs)
    return _ZOO_ENTRIES[name]


def get_entry(name: str) -> Entry:
    """The registry entry for ``name``; an unknown name raises a KeyError listing the valid ones.

    ``tv:NAME`` and ``timm:NAME`` are torchvision's and timm's models, resolved when named; an unknown one
    raises a KeyError with its close matches, a missing library :class:`perfkit.zoo.ZooUnavailable`.
    """
    _load()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if zoo.is_zoo_name(name):
        return _zoo_entry(name)
    raise KeyError(f"unknown block or network {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")


def create(name: str, **overrides: Any) -> nn.Module:
    """Build the block or network registered as ``name``, with keyword ``overrides``."""
    return get_entry(name).create(**overrides)


def list_blocks(pattern: str = "*", kind: str | None = None) -> list[str]:
    """Sorted names matching the glob ``pattern`` (``"resnet*"``), optionally only one ``kind``.

    A ``tv:``/``timm:`` pattern globs over that library's own model list (``"timm:res*"``), all networks;
    such a pattern without glob characters that names no model raises a KeyError with its close matches.
    """
    _load()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    if zoo.is_zoo_name(pattern):
        return zoo.list_models(pattern) if kind in (None, "network") else []
    return sorted(n for n, e in _REGISTRY.items()
                  if fnmatch.fnmatchcase(n, pattern) and (kind is None or e.kind == kind))
