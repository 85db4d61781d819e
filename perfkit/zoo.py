"""torchvision and timm models by name: the ``tv:NAME`` and ``timm:NAME`` entries, resolved when named.

The registry hands a namespaced name here (``perfkit.create("tv:resnet50")``, ``--perfkit-blocks=timm:*``).
This module imports the library, builds the model with random weights (never a download), reads its input
size from the library's own configuration, and finds a small input it accepts for the CPU-sized test
shape. Neither library is a dependency of perfkit: ``pip install 'perfkit[models]'`` (docs/zoo.md).
It imports nothing of perfkit's, so the registry can import it without a circle.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

LIBRARIES = {"tv": "torchvision", "timm": "timm"}
"""Namespace prefix (before the colon) -> the library whose models it names."""
INSTALL_HINT = "pip install 'perfkit[models]'"
DEFAULT_INPUT_SIZE = (3, 224, 224)
"""Where the library states none: torchvision's classification models are documented at 224."""
TEST_SIZE_STEP = 32
"""Test shapes are tried at multiples of the usual network stride, smallest first."""
TEST_BATCH = 2
"""The probe's batch: BatchNorm in training refuses one value per channel, as the tests' steps would."""

# googlenet and inception_v3 built without weights have auxiliary classifiers, and in training mode return
# a namedtuple of (logits, aux logits) that a step's loss cannot take; in eval they return the logits alone,
# so the deployed network runs without them. init_weights=True is their documented initialization,
# said explicitly so that torchvision does not warn that its default will change.
_TV_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}

# The two torchvision ops whose fakes torchvision's own import registers unconditionally
# (torchvision/_meta_registrations.py, torch.library.register_fake), with their C++ schemas.
_TORCHVISION_FAKED_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_torchvision_op_schemas: torch.library.Library | None = None
"""Kept alive on purpose: a ``Library`` removes its definitions when it is garbage collected."""


class ZooUnavailable(ImportError, KeyError):
    """A ``tv:``/``timm:`` name whose library is missing or cannot be imported.

    An ImportError for what went wrong, and a KeyError because that is what the registry raises for a
    name it cannot resolve, which the CLI and the matrix's options turn into a message and exit 2.
    """


@dataclass(frozen=True)
class ZooModel:
    """What the registry needs to make an entry of one torchvision or timm model."""

    factory: Callable[..., nn.Module]
    bench_shape: tuple[int, ...]
    """The library's input size (C, H, W): timm's ``pretrained_cfg``, torchvision's weights' crop size."""
    test_shape: tuple[int, ...]
    """The smallest square multiple of 32 that the model accepts, else ``bench_shape``."""
    description: str
    kwargs: dict[str, Any]


def is_zoo_name(name: str) -> bool:
    """Whether ``name`` (or a glob) is namespaced by a model library: ``tv:resnet50``, ``timm:res*``."""
    namespace, colon, _ = name.partition(":")
    return bool(colon) and namespace in LIBRARIES


def _split(name: str) -> tuple[str, str]:
    namespace, _, model = name.partition(":")
    if namespace not in LIBRARIES:
        raise KeyError(f"{name!r} has no model library prefix; valid prefixes: "
                       f"{', '.join(p + ':' for p in LIBRARIES)}")
    return namespace, model


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _purge(package: str) -> None:
    """Drop ``package`` and its submodules from ``sys.modules``, so the next import runs afresh."""
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[module]


def _unavailable(namespace: str, error: BaseException) -> ZooUnavailable:
    library = LIBRARIES[namespace]
    needs = library if namespace == "tv" else "timm (and torchvision, which timm imports)"
    return ZooUnavailable(f"{namespace}: models need {needs}, which cannot be imported "
                          f"({type(error).__name__}: {error}); install them with {INSTALL_HINT}")


def import_torchvision() -> ModuleType:
    """Import torchvision, also where its compiled ops cannot load.

    The torchvision wheel on PyPI links its C++ ops (``torchvision/_C.so``) against the CUDA torch
    libraries. On the CPU torch that library fails to load, which torchvision tolerates, but its import
    then registers fake kernels for ``torchvision::nms`` and ``qnms`` regardless, and fails with
    "operator torchvision::nms does not exist". The classification models use none of its ops, so where
    (and only where) that happens, the two schemas are defined without a kernel and torchvision imported
    again: calling ``torchvision.ops.nms`` still raises torchvision's own "Couldn't load custom C++ ops".
    Where torchvision imports (a matching build, the GPU image), this is a plain import.
    """
    global _torchvision_op_schemas
    try:
        import torchvision
        return torchvision
    except RuntimeError as error:
        if _torchvision_op_schemas is not None or not re.search(r"operator torchvision::\w+ does not exist",
                                                                str(error)):
            raise _unavailable("tv", error) from error
    except ImportError as error:
        raise _unavailable("tv", error) from error
    _purge("torchvision")
    _torchvision_op_schemas = torch.library.Library("torchvision", "FRAGMENT")
    for op, schema in _TORCHVISION_FAKED_OPS.items():
        if not hasattr(torch.ops.torchvision, op):
            _torchvision_op_schemas.define(schema)
    try:
        import torchvision
    except (ImportError, RuntimeError) as error:
        raise _unavailable("tv", error) from error
    return torchvision


def import_library(namespace: str) -> ModuleType:
    """The library of ``namespace`` (``"tv"``: torchvision, ``"timm"``), or :class:`ZooUnavailable`."""
    if namespace not in LIBRARIES:
        raise KeyError(f"unknown model library {namespace!r}; valid: {', '.join(LIBRARIES)}")
    if namespace == "tv":
        return import_torchvision()
    # timm imports torchvision (its data transforms): made importable first, the same way.
    try:
        import_torchvision()
        import timm
    except ZooUnavailable as error:  # torchvision's own failure, said once, for the timm: name
        raise _unavailable(namespace, error.__cause__ or error) from error
    except (ImportError, RuntimeError) as error:
        raise _unavailable(namespace, error) from error
    return timm


@functools.cache
def _library_models(namespace: str, tagged: bool) -> tuple[str, ...]:
    """Every model name the library lists: torchvision's classification models, timm's architectures (or,
    ``tagged``, its ``arch.tag`` pretrained configurations)."""
    library = import_library(namespace)
    if namespace == "tv":
        return tuple(sorted(library.models.list_models(module=library.models)))
    return tuple(library.list_pretrained() if tagged else library.list_models())


def list_models(pattern: str) -> list[str]:
    """Namespaced names matching the glob ``pattern`` (``"timm:res*"``) over the library's own list.

    A pattern without glob characters is a name: one the library does not have raises a KeyError that
    names the close matches.
    """
    namespace, model_pattern = _split(pattern)
    models = _library_models(namespace, tagged=namespace == "timm" and "." in model_pattern)
    matches = sorted(f"{namespace}:{m}" for m in fnmatch.filter(models, model_pattern))
    if not matches and not _is_glob(model_pattern):
        raise KeyError(_unknown_message(namespace, model_pattern, models))
    return matches


def _unknown_message(namespace: str, model: str, models: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(model, models, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(f'{namespace}:{m}' for m in close)}" if close else "no close match"
    every = f"{namespace}:*.*" if "." in model else f"{namespace}:*"
    return (f"unknown {LIBRARIES[namespace]} model {model!r} ({hint}); "
            f"`perfkit list '{every}'` lists all {len(models)}")


def _build(make: Callable[[], nn.Module]) -> nn.Module:
    """``make()``, on the meta device too: a constructor that reads back a tensor it computed (torchvision's
    RegNet sizes its stages with ``.tolist()``) is built on the CPU and moved to meta."""
    try:
        return make()
    except (NotImplementedError, RuntimeError):
        if torch.get_default_device().type != "meta":
            raise
    with torch.device("cpu"):
        return make().to("meta")


def build_torchvision(model: str, **kwargs: Any) -> nn.Module:
    """torchvision's ``model`` with random weights (``weights=None``: nothing is downloaded)."""
    torchvision = import_library("tv")
    return _build(lambda: torchvision.models.get_model(model, weights=None, **kwargs))


def build_timm(model: str, **kwargs: Any) -> nn.Module:
    """timm's ``model`` with random weights (``pretrained=False``: nothing is downloaded)."""
    timm = import_library("timm")
    return _build(lambda: timm.create_model(model, pretrained=False, **kwargs))


def _torchvision_input_size(torchvision: ModuleType, model: str) -> tuple[int, ...]:
    """The smallest crop size among the model's published weights: the size its docs state, and the one
    the weight-less model is built for (``vit_h_14``'s 518 belongs to its fine-tuned SWAG weights)."""
    # crop_size is a one-element list: the square side.
    sides = [side for w in torchvision.models.get_model_weights(model)
             for side in getattr(w.transforms(), "crop_size", None) or []]
    return (3, min(sides), min(sides)) if sides else DEFAULT_INPUT_SIZE


def _doc_line(obj: Any) -> str:
    """The docstring's first paragraph on one line, without reStructuredText's link markup."""
    paragraph = " ".join((getattr(obj, "__doc__", None) or "").strip().split("\n\n")[0].split())
    return re.sub(r"`([^`<]+?)\s*<[^>]*>`_*", r"\1", paragraph)


def smallest_test_shape(module: nn.Module, bench_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The smallest square input, a multiple of 32 below the benchmark size, on which ``module`` (on the
    meta device) runs a training-mode forward; else ``bench_shape`` (a ViT accepts only its own size)."""
    channels, height, width = bench_shape
    module.train()
    for size in range(TEST_SIZE_STEP, min(height, width), TEST_SIZE_STEP):
        try:
            with torch.no_grad():
                module(torch.empty(TEST_BATCH, channels, size, size, device="meta"))
        except Exception:  # a model refuses a size with whatever its own check raises
            continue
        return (channels, size, size)
    return tuple(bench_shape)


def resolve(name: str) -> ZooModel:
    """The factory, shapes and description of ``tv:NAME`` or ``timm:NAME``; a KeyError names close matches
    for a name the library does not have, :class:`ZooUnavailable` says how to install a missing library."""
    namespace, model = _split(name)
    if _is_glob(model):
        raise KeyError(f"{name!r} is a glob, not a model; perfkit.list_blocks({name!r}) lists the names it matches")
    list_models(name)  # a name the library does not have raises here, with its close matches
    library = import_library(namespace)
    kwargs = dict(_TV_KWARGS.get(model, {})) if namespace == "tv" else {}
    build = build_torchvision if namespace == "tv" else build_timm
    with torch.device("meta"):
        module = build(model, **kwargs)
    if namespace == "tv":
        bench_shape = _torchvision_input_size(library, model)
        description = f"torchvision: {_doc_line(library.models.get_model_builder(model))}"
    else:
        cfg = getattr(module, "pretrained_cfg", None) or {}
        bench_shape = tuple(cfg.get("input_size") or DEFAULT_INPUT_SIZE)
        description = f"timm {model}: input size from its pretrained_cfg {cfg.get('tag') or '(default)'}"
    extra = f" ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else ""
    return ZooModel(functools.partial(build, model), bench_shape, smallest_test_shape(module, bench_shape),
                    description + extra, kwargs)
