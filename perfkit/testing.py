"""Correctness helpers shared by the benchmark's gate and the tests: one tolerance table, one comparison.

Errors are relative in the 2-norm, ``‖actual − expected‖ / ‖expected‖``, computed in float64 against a
float64 reference: a per-element tolerance would fail on the few elements near zero that any reordering
of a sum moves, while this one measures what a user feels.
"""

from __future__ import annotations

import torch

REL_TOLERANCE: dict[str, float] = {
    "float64": 1e-12,
    "float32": 1e-4,
    "tf32": 1e-3,
    "bfloat16": 2e-2,
    "float16": 1e-2,
}
"""Largest relative error accepted for a result computed in (or stored as) each dtype."""

GRAD_REL_TOLERANCE: dict[str, float] = {
    "float64": 1e-10,
    "float32": 1e-3,
    "tf32": 5e-3,
    "bfloat16": 1e-1,
    "float16": 5e-2,
}
"""Largest relative error accepted for the gradients of a training step in each compute dtype.

Looser than the output's: a low-precision forward flips a few ReLU decisions (about 0.1% of them in
bf16), and each flip moves one term of a weight gradient's sum of terms of random sign, so the error
comes out near the square root of the flip rate (measured: 5e-2 to 7e-2 for bf16 blocks on the CPU,
4e-3 for one conv+BN without a ReLU). A wrong kernel is off by order one.
"""


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; strings pass through after a check against the table."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in REL_TOLERANCE:
        raise ValueError(f"no tolerance for dtype {name!r}; known: {sorted(REL_TOLERANCE)}")
    return name


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖₂ / ‖expected‖₂`` in float64; NaN or inf anywhere gives ``inf``."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | str, name: str = "output",
                 tolerance: float | None = None) -> None:
    """Raise an AssertionError naming the relative error and the worst element if ``actual`` is off."""
    tol = REL_TOLERANCE[dtype_name(dtype)] if tolerance is None else tolerance
    err = relative_error(actual, expected)
    if err <= tol:
        return
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    abs_diff = (a - e).abs().nan_to_num(float("inf"))
    worst = int(abs_diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
    raise AssertionError(
        f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype_name(dtype)}); worst element at {index}: "
        f"{a.flatten()[worst].item():.6g} vs expected {e.flatten()[worst].item():.6g}"
    )
