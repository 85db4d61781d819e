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
    "bfloat16": 3e-1,
    "float16": 5e-2,
}
"""Largest relative error accepted for the gradients of a training step in each compute dtype.

Looser than the output's: a low-precision forward flips a few ReLU decisions (about 0.1% of them in
bf16), and each flip moves one term of a weight gradient's sum of terms of random sign, so the error
comes out near the square root of the flip rate (measured at the test shapes, batch 8, on the CPU: 5.5e-2
to 2.1e-1 for bf16 blocks, the largest for the 12-convolution CSP block; 4e-3 for one conv+BN without a
ReLU). A wrong kernel is off by order one.
"""


EAGER_SANITY_TOLERANCE: dict[str, tuple[float, float]] = {
    "float32": (7e-3, 5e-1),
    "tf32": (5e-2, 5e-1),
}
"""(output, gradients) bound on eager's own error against float64. Eager *is* the reference
implementation, so this only catches a broken harness (or a block planted wrong, 1% off). Worst eager
float32 errors measured over the registry at the test shapes, batch 8, CPU: output 3.0e-3, gradients
1.2e-1, both resnet152 training (BatchNorm over batch x 1x1 maps is ill-conditioned: the float64
reference itself moves that much under float32 rounding); docs/methodology.md, "The correctness gate"."""

ACCURACY_MULTIPLIER = 3.0
"""A float32 variant may be this many times as far from float64 as eager float32 is (PyTorch's dynamo
benchmark harness uses 2-3 for its fp64-referenced accuracy check)."""

ACCURACY_FLOOR: dict[str, tuple[float, float]] = {
    "float32": (1e-5, 1e-4),
    "tf32": (1e-4, 1e-3),
}
"""(output, gradients) floor added to the multiple of eager's error: a block whose eager error is near
zero (a single convolution at a small shape) must not demand bit-exactness of a reordered sum."""


UNIT_ROUNDOFF: dict[str, float] = {"float32": 2.0**-24, "tf32": 2.0**-11, "bfloat16": 2.0**-8, "float16": 2.0**-11}

REDUCED_PRECISION_CAP = 0.5
"""A reduced-precision result off by more than half its norm is wrong whatever the conditioning."""


def gate_tolerance(dtype: str, eager_error: float | None, gradients: bool = False) -> float:
    """The largest relative error against float64 a variant computing in ``dtype`` may have.

    float32 (and tf32) variants: ``ACCURACY_MULTIPLIER × eager's error + ACCURACY_FLOOR``, capped at eager's
    own sanity bound (so a broken eager cannot license a broken variant). Reduced precision: the fixed
    table, or, where eager float32 shows the cell ill-conditioned, eager's error scaled from float32's unit
    roundoff to the dtype's (rounding error grows as the condition number times the unit roundoff), times
    ``ACCURACY_MULTIPLIER``, at most :data:`REDUCED_PRECISION_CAP`. Without eager's error: the fixed table.
    """
    table = GRAD_REL_TOLERANCE if gradients else REL_TOLERANCE
    fixed = table[dtype_name(dtype)]
    if eager_error is None or not eager_error == eager_error:
        return fixed
    which = 1 if gradients else 0
    if dtype in ACCURACY_FLOOR:
        bound = EAGER_SANITY_TOLERANCE[dtype][which]
        return min(bound, ACCURACY_MULTIPLIER * eager_error + ACCURACY_FLOOR[dtype][which])
    if eager_error > EAGER_SANITY_TOLERANCE["float32"][which]:
        return fixed
    scaled = ACCURACY_MULTIPLIER * eager_error * UNIT_ROUNDOFF[dtype] / UNIT_ROUNDOFF["float32"]
    return min(REDUCED_PRECISION_CAP, max(fixed, scaled))


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
