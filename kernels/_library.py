"""How perfkit's Triton kernels become ``torch.library`` ops: one decorator and one launch helper.

PyTorch's recipe for user-defined Triton kernels is ``torch.library.triton_op`` with every launch going
through ``torch.library.wrap_triton``: the op is opaque to autograd and dynamo (no graph break, a fake
implementation for shapes), while inductor still sees the kernels and can schedule them with its own.
Two cases fall back to ``torch.library.custom_op`` (the same op, opaque to inductor too):

* torch older than 2.6, which has neither ``triton_op`` nor ``wrap_triton``;
* ``TRITON_INTERPRET=1``: ``@triton.jit`` then yields interpreter functions that ``wrap_triton`` does not
  accept and inductor cannot compile, so the CPU test runs keep the kernels opaque.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
"""triton.jit picks the compiler or the interpreter when the kernels are decorated, at import."""

USES_TRITON_OP = (not INTERPRETED and hasattr(torch.library, "triton_op")
                  and hasattr(torch.library, "wrap_triton"))
"""Whether ops are registered with ``triton_op`` (inductor sees the kernels) rather than ``custom_op``."""


def op(name: str, *, mutates_args: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Any]:
    """Decorator registering a function as the op ``perfkit::<name>`` (``triton_op`` or ``custom_op``)."""
    qualified = f"perfkit::{name}"
    if USES_TRITON_OP:
        return torch.library.triton_op(qualified, mutates_args=tuple(mutates_args))
    return torch.library.custom_op(qualified, mutates_args=tuple(mutates_args))


def launch(kernel: Any) -> Any:
    """``kernel`` made launchable from inside an op: wrapped for tracing under ``triton_op``, else as is."""
    return torch.library.wrap_triton(kernel) if USES_TRITON_OP else kernel
