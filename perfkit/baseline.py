"""The CI counter gate: ``perfkit baseline [--write] [--path FILE]`` and ``tests/test_baseline.py``.

For every cell of the quick profile's blocks x ``BASELINE_VARIANTS`` x mode at its CPU batch, the gate
recomputes figures that are the same on every machine and compares them exactly with the committed
``benchmarks/baselines/cpu-quick-counters.json``:

- ``flops_per_step``: ``torch.utils.flop_counter`` on the meta device;
- ``params``: the parameter count;
- ``predicted_peak_bytes`` and ``predicted_<category>_bytes``: the tensor-level memory model
  (``perfkit.measure.memory_model``): each category's own peak during a step, run under ``FakeTensorMode``.

None of them runs a kernel, so none reads what the machine chooses: oneDNN's scratch (which depends on the
ISA and the thread count), the thread pool, the allocator. A block that starts keeping twice its
activations moves ``predicted_activations_bytes`` by +100% on every machine. The profiler's measured CPU
peak stays in every benchmark record as a measurement; it is not gated, because it includes that scratch.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE_PATH = REPO_ROOT / "benchmarks" / "baselines" / "cpu-quick-counters.json"
BASELINE_SCHEMA = "perfkit.counters/2"
BASELINE_VARIANTS = ("eager", "channels_last", "bf16", "triton")
"""``triton`` is gated where the block has a fused kernel: its ops' fake implementations give the fused
blocks' memory (the dense block's linear growth) without running a kernel."""
GATED_CATEGORIES = ("parameters", "buffers", "gradients", "activations", "temporaries", "optimizer_state")


class BaselineError(ValueError):
    """The baseline file cannot be found, read or written; the message says what to do."""


def default_baseline_path() -> Path:
    """The checkout's baseline file; BaselineError when perfkit runs from an installed wheel."""
    if not BASELINE_PATH.parent.parent.is_dir():
        raise BaselineError(f"no benchmarks/ folder next to the perfkit package ({REPO_ROOT}): perfkit runs from "
                            "an installed wheel, and the counter baseline lives in a checkout. Pass "
                            "--path CHECKOUT/benchmarks/baselines/cpu-quick-counters.json")
    return BASELINE_PATH


def quick_profile() -> tuple[list[str], int]:
    """The quick profile's registered blocks and its block batch (``perfkit.matrix.profiles.PROFILES``)."""
    import fnmatch

    import perfkit
    from perfkit.matrix.profiles import PROFILES

    profile = PROFILES["quick"]
    names = [n for n in perfkit.list_blocks() if any(fnmatch.fnmatchcase(n, p) for p in profile.blocks)]
    return names, profile.block_batches[0]


def cell_counters(name: str, variant: str, mode: str, batch: int) -> dict[str, int]:
    """The gated figures of one quick-profile cell (test shape), computed without running a kernel."""
    import torch

    from perfkit.measure import step_flops
    from perfkit.measure.memory_model import predict_step_memory
    from perfkit.registry import get_entry

    entry = get_entry(name)
    with torch.device("meta"):
        params = sum(p.numel() for p in entry.create().parameters())
    prediction = predict_step_memory(name, variant, mode, batch, bench_shape=False, top_modules=0)
    counters = {"flops_per_step": step_flops(entry, batch, False, mode, entry.kind == "block"), "params": params,
                "predicted_peak_bytes": prediction.peak_bytes}
    counters.update({f"predicted_{c}_bytes": prediction.category_peaks[c] for c in GATED_CATEGORIES})
    return counters


def _gated(name: str, variant: str) -> bool:
    """Every variant but ``triton``, which only where the block has a fused kernel."""
    if variant != "triton":
        return True
    import torch

    from perfkit.fused import fusable_modules
    from perfkit.registry import get_entry

    with torch.device("meta"):
        return bool(fusable_modules(get_entry(name).create()))


def compute_baseline() -> dict:
    """The gated figures of every quick-profile block x ``BASELINE_VARIANTS`` x mode at the profile's batch."""
    from perfkit.measure.memory_model import METHOD
    from perfkit.variants import MODES

    names, batch = quick_profile()
    cells = {f"{name}/{variant}/{mode}/b{batch}": cell_counters(name, variant, mode, batch)
             for name in names for variant in BASELINE_VARIANTS if _gated(name, variant) for mode in MODES}
    return {"schema": BASELINE_SCHEMA, "memory_method": METHOD, "torch": _torch_version(),
            "shape": "test", "batch": batch, "refresh": "perfkit baseline --write", "cells": cells}


def write_baseline(path: str | Path | None = None) -> Path:
    """Recompute the figures and overwrite the baseline file (``perfkit baseline --write``).

    The file's folder must exist already: a wrong path is an error, never a new folder somewhere.
    """
    path = Path(path) if path is not None else default_baseline_path()
    if not path.parent.is_dir():
        raise BaselineError(f"{path.parent} is not a folder; give --path inside a checkout's benchmarks/baselines/")
    path.write_text(json.dumps(compute_baseline(), indent=1, sort_keys=True) + "\n")
    return path


def _ratio(before: int, after: int) -> str:
    if before == 0:
        return "new" if after else "same"
    return f"x{after / before:.3f}, {(after - before) / before:+.2%}"


def diff_baseline(stored: dict, current: dict) -> list[str]:
    """Every difference between two baselines, one line each: the cell, the figure, both values and the ratio."""
    if stored.get("schema") != BASELINE_SCHEMA:
        return [f"baseline schema {stored.get('schema')!r}, expected {BASELINE_SCHEMA!r}"]
    problems = [f"{key}: baseline {stored.get(key)!r}, now {current[key]!r}"
                for key in ("memory_method", "batch", "shape") if stored.get(key) != current[key]]
    old, new = stored.get("cells", {}), current["cells"]
    for cell in sorted(set(old) | set(new)):
        if cell not in new:
            problems.append(f"{cell}: in the baseline but no longer in the quick profile")
        elif cell not in old:
            problems.append(f"{cell}: in the quick profile but not in the baseline")
        else:
            for counter in sorted(set(old[cell]) | set(new[cell])):
                before, after = old[cell].get(counter), new[cell].get(counter)
                if before is None or after is None:
                    problems.append(f"{cell}: {counter} {before} -> {after}")
                elif before != after:
                    problems.append(f"{cell}: {counter} {before} -> {after} ({_ratio(before, after)})")
    return problems


def check_baseline(path: str | Path | None = None) -> list[str]:
    """Recompute the figures and list every difference from the baseline file (empty: all match)."""
    path = Path(path) if path is not None else default_baseline_path()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return [f"{path}: cannot read the counter baseline ({exc}); `perfkit baseline --write` creates it"]
    problems = diff_baseline(stored, compute_baseline())
    if problems and stored.get("torch") not in (None, _torch_version()):
        problems.append(f"The baseline was written with torch {stored.get('torch')}, this is torch {_torch_version()}: "
                        "a torch upgrade can move the memory model's figures (a changed decomposition).")
    if problems:
        problems.append("If the change is intended, refresh the baseline with `perfkit baseline --write` and "
                        "commit it with the change.")
    return problems


def _torch_version() -> str:
    """This torch's version without its local build tag (2.13.0+cpu -> 2.13.0)."""
    import torch

    return torch.__version__.split("+")[0]
