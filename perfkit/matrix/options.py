"""The matrix's ``--perfkit-*`` options: one table, :data:`OPTIONS`, and one ``parse_*`` function per option.

An option's value comes from the command line, else from its environment variable, and either goes through
the same parser, so ``PERFKIT_BLOCKS=nope`` and ``--perfkit-blocks=nope`` fail alike. A parser raises
:class:`OptionError` with a message that names the option and the valid values; the pytest plugin turns it
into a usage error. The options and the JSON they produce are described in ``docs/matrix.md``.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from perfkit.env.device import default_device
from perfkit.env.machine import available_cores
from perfkit.matrix import shard
from perfkit.matrix.profiles import KERNELS, PROFILES
from perfkit.measure import GATE_SEEDS, MEMORY_MODELS
from perfkit.registry import IMPORT_ENV, list_blocks
from perfkit.variants import MODES, parse_variant
from perfkit.zoo import is_zoo_name

MALLOC_CHOICES = ("pinned", "default")
"""``--perfkit-malloc``: glibc's thresholds pinned before the first cell, or glibc's moving ones."""
DEFAULT_JSONL = "out/results.jsonl"
"""Where every cell's record is appended unless ``--perfkit-jsonl`` says otherwise."""


class OptionError(ValueError):
    """A bad ``--perfkit-*`` value (from the option or its variable); the message names the valid ones."""


@dataclass(frozen=True)
class Option:
    """One ``--perfkit-*`` option: its flag, its environment variable and its one-line help."""

    flag: str
    env: str | None
    """The variable read when the option is not given (None: there is none)."""
    help: str
    switch: bool = False
    """An option without a value (``--perfkit-isolate``); its variable turns it on with ``1``."""

    @property
    def name(self) -> str:
        """The option's key in :func:`option_values` (``--perfkit-memory-model`` -> ``memory_model``)."""
        return self.flag.removeprefix("--perfkit-").replace("-", "_")

    @property
    def dest(self) -> str:
        """The attribute pytest stores the option under (``perfkit_memory_model``)."""
        return f"perfkit_{self.name}"


OPTIONS = (
    Option("--perfkit-profile", "PERFKIT_PROFILE",
           f"matrix profile: {', '.join(PROFILES)} (default: full with a GPU, quick without)"),
    Option("--perfkit-blocks", "PERFKIT_BLOCKS",
           "comma-separated block/network names or globs (default: the profile's)"),
    Option("--perfkit-variants", "PERFKIT_VARIANTS",
           "comma-separated variants, atoms joined with '+' (default: the profile's)"),
    Option("--perfkit-modes", "PERFKIT_MODES", f"comma-separated modes from {', '.join(MODES)} (default: both)"),
    Option("--perfkit-batches", "PERFKIT_BATCHES", "comma-separated batch sizes (default: the profile's)"),
    Option("--perfkit-device", "PERFKIT_DEVICE", "torch device to measure on (default: cuda if available, else cpu)"),
    Option("--perfkit-jsonl", "PERFKIT_JSONL",
           f"JSON-lines file each cell's record is appended to (default: {DEFAULT_JSONL})"),
    Option("--perfkit-kernels", "PERFKIT_KERNELS",
           f"comma-separated kernels from {', '.join(KERNELS)}, or none (default: all)"),
    Option("--perfkit-shard", "PERFKIT_SHARD",
           "K/N: run only shard K of N (1-based), cells balanced by estimated cost"),
    Option("--perfkit-import", IMPORT_ENV,
           "comma-separated modules to import first; their @perfkit.register calls add blocks"),
    Option("--perfkit-threads", "PERFKIT_THREADS",
           "torch intra-op threads per cell, 1 to the cores this process may run on (default: torch's default, at "
           "most the cores not kept busy by other processes at the start of the run)"),
    Option("--perfkit-memory-model", "PERFKIT_MEMORY_MODEL",
           f"when the memory model predicts a cell: {', '.join(MEMORY_MODELS)} (default: auto, every cell on a GPU, "
           "elsewhere only where memory is tight)"),
    Option("--perfkit-malloc", "PERFKIT_MALLOC",
           f"glibc malloc for the cells: {', '.join(MALLOC_CHOICES)} (default: pinned thresholds, the same whatever "
           "ran before a cell)"),
    Option("--perfkit-isolate", "PERFKIT_ISOLATE", "measure each block's cells in a fresh process", switch=True),
    Option("--perfkit-gate-seeds", "PERFKIT_GATE_SEEDS",
           f"inputs the correctness gate checks each cell on before timing, the timed one among them (default: "
           f"{GATE_SEEDS}); one more, never seen before, is checked after timing"),
)
"""Every ``--perfkit-*`` option, in ``pytest --help``'s order; the plugin registers exactly these."""


def option_values(getoption: Callable[[str], object]) -> dict[str, str | None]:
    """Each option's text by name: the command line's (``getoption(dest)``), else its variable's.

    An empty variable counts as unset; a given switch reads as ``"1"``, as its variable does.
    """
    values: dict[str, str | None] = {}
    for option in OPTIONS:
        given = getoption(option.dest)
        if option.switch:
            given = "1" if given else None
        if given is None and option.env:
            given = os.environ.get(option.env) or None
        values[option.name] = given
    return values


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_device(text: str | None) -> torch.device:
    """``--perfkit-device``: a torch device this machine has (default: cuda when a GPU is present, else cpu)."""
    try:
        device = torch.device(text) if text else default_device()
    except RuntimeError as error:
        raise OptionError(f"--perfkit-device {text!r}: {error}; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--perfkit-device cuda: no CUDA GPU is available here; use cpu")
    return device


def parse_profile(text: str | None, device: torch.device) -> str:
    """``--perfkit-profile``: a name of :data:`PROFILES` (default: ``full`` on a GPU, ``quick`` elsewhere)."""
    name = text or ("full" if device.type == "cuda" else "quick")
    if name not in PROFILES:
        raise OptionError(f"unknown --perfkit-profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    return name


def parse_blocks(text: str | None, registered: list[str], default: tuple[str, ...]) -> list[str]:
    """``--perfkit-blocks``: the registered names each glob matches, in order, once each (default: the
    registered names that match one of ``default``, the profile's)."""
    if not text:
        return [n for n in registered if any(fnmatch.fnmatchcase(n, p) for p in default)]
    blocks: list[str] = []
    for pattern in _split(text):
        try:
            # tv:/timm: names are the model libraries' own, resolved when named (perfkit/zoo.py).
            matches = list_blocks(pattern) if is_zoo_name(pattern) else fnmatch.filter(registered, pattern)
        except KeyError as error:  # an unknown model (with its close matches) or a missing library
            raise OptionError(f"--perfkit-blocks: {error.args[0]}") from None
        if not matches:
            raise OptionError(f"--perfkit-blocks: {pattern!r} matches no registered block or network; "
                              f"valid names: {', '.join(registered)}")
        blocks += [m for m in matches if m not in blocks]
    return blocks


def parse_variants(text: str | None) -> list[str] | None:
    """``--perfkit-variants``: canonical variant names, once each (None: the profile's, with its extra cells)."""
    if not text:
        return None
    variants: list[str] = []
    for name in _split(text):
        try:
            canonical = parse_variant(name).name
        except ValueError as error:
            raise OptionError(f"--perfkit-variants: {error}") from None
        if canonical not in variants:
            variants.append(canonical)
    return variants


def parse_modes(text: str | None, default: tuple[str, ...]) -> list[str]:
    """``--perfkit-modes``: modes from :data:`perfkit.variants.MODES` (default: ``default``, the profile's)."""
    if not text:
        return list(default)
    modes = _split(text)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise OptionError(f"--perfkit-modes: unknown mode(s) {bad}; valid modes: {', '.join(MODES)}")
    return modes


def parse_batches(text: str | None) -> list[int] | None:
    """``--perfkit-batches``: positive batch sizes (None: the profile's)."""
    if not text:
        return None
    try:
        batches = [int(b) for b in _split(text)]
    except ValueError:
        batches = []
    if not batches or any(b < 1 for b in batches):
        raise OptionError(f"--perfkit-batches {text!r}: give positive integers, e.g. 32,128")
    return batches


def parse_jsonl(text: str | None) -> Path:
    """``--perfkit-jsonl``: the JSON-lines file every record is appended to (default: :data:`DEFAULT_JSONL`)."""
    return Path(text or DEFAULT_JSONL)


def parse_kernels(text: str | None) -> list[str]:
    """``--perfkit-kernels``: kernels from :data:`perfkit.matrix.profiles.KERNELS`, or ``none`` (default: all)."""
    if not text:
        return list(KERNELS)
    kernels = [] if text.strip() == "none" else _split(text)
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        raise OptionError(f"--perfkit-kernels: unknown kernel(s) {bad}; valid kernels: {', '.join(KERNELS)} (or none)")
    return kernels


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--perfkit-shard``: ``K/N`` as (K, N) (None: the whole matrix)."""
    if not text:
        return None
    try:
        return shard.parse_shard(text)
    except ValueError as error:
        raise OptionError(f"--perfkit-shard: {error}") from None


def parse_import(text: str | None) -> list[str]:
    """``--perfkit-import``: the modules to import before the blocks are listed (default: none)."""
    return _split(text) if text else []


def parse_threads(text: str | None) -> int | None:
    """``--perfkit-threads``: a positive thread count (None: judged before the first cell)."""
    if not text:
        return None
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        cores = available_cores()
        raise OptionError(f"--perfkit-threads {text!r}: give a positive integer; this process may run on {cores} "
                          f"core(s), so 1..{cores} avoids oversubscription")
    return threads


def parse_memory_model(text: str | None) -> str:
    """``--perfkit-memory-model``: one of :data:`perfkit.measure.MEMORY_MODELS` (default: ``auto``)."""
    memory_model = text or "auto"
    if memory_model not in MEMORY_MODELS:
        raise OptionError(f"--perfkit-memory-model {memory_model!r}: valid choices are {', '.join(MEMORY_MODELS)}")
    return memory_model


def parse_malloc(text: str | None) -> str:
    """``--perfkit-malloc``: one of :data:`MALLOC_CHOICES` (default: ``pinned``)."""
    malloc = text or "pinned"
    if malloc not in MALLOC_CHOICES:
        raise OptionError(f"--perfkit-malloc {malloc!r}: valid choices are {', '.join(MALLOC_CHOICES)}")
    return malloc


def parse_gate_seeds(text: str | None) -> int:
    """``--perfkit-gate-seeds``: how many inputs the gate checks before timing, at least 1 (default:
    :data:`perfkit.measure.GATE_SEEDS`)."""
    if not text:
        return GATE_SEEDS
    try:
        seeds = int(text)
    except ValueError:
        seeds = 0
    if seeds < 1:
        raise OptionError(f"--perfkit-gate-seeds {text!r}: give a positive integer, the inputs checked before timing "
                          f"(1 is the timed input alone; default {GATE_SEEDS})")
    return seeds


def parse_isolate(text: str | None) -> bool:
    """``--perfkit-isolate``: on when given, or when its variable is ``1``."""
    return text == "1"


def selection_env(environ: Mapping[str, str]) -> list[str]:
    """``NAME=value`` for each option's variable set in ``environ``, sorted: part of the command that reruns a run."""
    return [f"{name}={environ[name]}" for name in sorted(o.env for o in OPTIONS if o.env) if environ.get(name)]
