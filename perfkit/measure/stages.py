"""What every cell shares around its phases: wall time per stage, a failure recorded in the stage it
happened, and torch's intra-op threads set for the cell."""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Stages:
    """Wall time per stage of a cell (``wall_split_s``), and the stage a failure is reported in."""

    def __init__(self, label: str = "build") -> None:
        self.split: dict[str, float] = {}
        self.label = label
        """What a failure now reports as its stage."""
        self._name: str | None = None
        self._start = time.perf_counter()

    def enter(self, name: str, label: str | None = None) -> None:
        """Close the current stage and start ``name`` (``label`` is what a failure in it reports)."""
        now = time.perf_counter()
        if self._name is not None:
            self.split[self._name] = self.split.get(self._name, 0.0) + now - self._start
        self._name, self._start = name, now
        self.label = label or name

    def close(self, timed_s: float | None = None) -> dict[str, float]:
        """Close the current stage; the split so far. ``timed_s``, the timed rounds' own time, is taken out of
        the ``timing`` stage into ``timed rounds``, so the rest of ``timing`` is the harness's overhead."""
        self.enter("done")
        if timed_s is not None:
            self.split["timing"] -= timed_s
            self.split["timed rounds"] = timed_s
        return self.split


def is_oom(error: BaseException) -> bool:
    """True for an out-of-memory error: torch's, the CPU allocator's, or one a compile wrapper chained."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError; compile wrappers may chain the original OOM.
    text = str(error)
    cause = error.__cause__ or error.__context__
    return ("DefaultCPUAllocator: can't allocate memory" in text or "out of memory" in text.lower()
            or (cause is not None and cause is not error and is_oom(cause)))


def error_message(error: BaseException, limit: int = 600) -> str:
    """``Type: message`` of ``error``, cut at ``limit`` characters."""
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def failure(error: BaseException, stage: str) -> tuple[str, str]:
    """(status, reason) of a cell that raised ``error`` in ``stage``: ``oom`` or ``error``, never raised on."""
    return ("oom" if is_oom(error) else "error"), f"{stage}: {error_message(error)}"


def interpreted_reason(rel_error: float) -> str:
    """Why a Triton cell that passed its gate under ``TRITON_INTERPRET=1`` is not timed."""
    return (f"correctness checked (relative error {rel_error:.2e}); not timed: TRITON_INTERPRET=1 runs the kernels "
            "in the interpreter")


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[int]:
    """Torch's intra-op threads set to ``threads`` (left as they are when None) for the block, then restored;
    yields the count in force."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
