"""The correctness gate: a cell is checked against a float64 reference before it is timed.

The model is built under a fixed seed; once per (entry, mode, batch) group a float64 copy runs the same batch
under the same seed (inference: the output; training: the output and every gradient after one forward and
backward), and so does eager float32 (:class:`GroupState`, shared by the group's variants through a
:class:`GroupCache`). Relative errors ``‖a − ref‖/‖ref‖``: eager is held to its own sanity bound, a float32
variant to a multiple of eager's error plus a floor (the dynamo harness's rule), reduced precision to its
table or eager's error scaled to its unit roundoff (``perfkit.testing.gate_tolerance``). A cell over
tolerance is ``failed`` and is not timed, so it can never read as a speedup. The gate's call is the
variant's first call, so for a compiled variant it is the compile time.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from perfkit.measure.stages import Stages
from perfkit.measure.timing import synchronizer
from perfkit.registry import Entry, get_entry
from perfkit.testing import ACCURACY_FLOOR, ACCURACY_MULTIPLIER, EAGER_SANITY_TOLERANCE, relative_error
from perfkit.variants import Prepared, Variant, gradients, loss_target, parse_variant, training_loss

EAGER = parse_variant("eager")


def tolerance_dtype(variant: Variant, device: torch.device | str) -> str:
    """The tolerance table's key for ``variant`` on ``device``: its compute dtype, or tf32 where allowed."""
    dtype = variant.compute_dtype
    if dtype == "float32" and torch.device(device).type == "cuda" and (
        torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    ):
        return "tf32"
    return dtype


def _reference(model: nn.Module, x: torch.Tensor, mode: str, input_requires_grad: bool,
               seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The float64 copy's output (and gradients, in training) on the same batch."""
    reference = copy.deepcopy(model).to(torch.float64)
    training = mode == "training"
    reference.train(training)
    x64 = x.detach().to(torch.float64).requires_grad_(training and input_requires_grad)
    if not training:
        with torch.no_grad():
            return reference(x64), []
    out = reference(x64)
    training_loss(out, loss_target(out, seed)).backward()
    return out.detach(), [g.detach() for g in gradients(list(reference.parameters()), x64)]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])



@dataclass
class GroupState:
    """What the variants of one (entry, mode, batch) group share: computed once, by the group's first cell.

    The float64 reference (same seed, input and model for every variant), eager float32's error against
    it (the calibrated gate's yardstick), the eager cell itself, prepared and kept warm to be timed beside
    each variant, and the FLOP count (of the eager step, the same for every variant).
    """

    ref_out: torch.Tensor
    ref_grad: torch.Tensor | None
    eager_error: float
    eager_grad_error: float | None
    eager: Prepared | None
    """None when eager failed its own gate (``eager_failure`` says why): its variants are timed unpaired."""
    eager_failure: str | None
    eager_first_call_s: float
    eager_warm: bool = False
    flops: int | None = None
    gate_batch: int | None = None
    """The batch the reference (and so every variant's gate) ran at: the cell's, or the largest that fits."""


class GroupCache:
    """The :class:`GroupState` of each group of the entry being measured; a new entry drops the previous ones.

    The matrix runs an entry's cells together (its variants, modes and batches), so holding only the
    current entry's groups bounds the memory kept: one eager model, input and optimizer state per mode and
    batch of one entry.
    """

    def __init__(self) -> None:
        self._entry: tuple | None = None
        self._groups: dict[tuple, GroupState] = {}

    def get(self, entry_key: tuple, group_key: tuple) -> GroupState | None:
        """The group's state, or None; a different ``entry_key`` than the last one empties the cache."""
        if entry_key != self._entry:
            self._groups.clear()
            self._entry = entry_key
        return self._groups.get(group_key)

    def put(self, group_key: tuple, state: GroupState) -> None:
        """Keep ``state`` for the rest of this entry's cells."""
        self._groups[group_key] = state

    def clear(self) -> None:
        """Drop every kept group (its eager model and tensors)."""
        self._groups.clear()
        self._entry = None



def first_call(prepared: Prepared, mode: str, seed: int, sync: Callable[[], None], gate_batch: int
               ) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """The variant's first call, on the first ``gate_batch`` samples (as the reference ran), for the gate:
    (output, gradients, seconds it took)."""
    full_inputs = prepared.inputs
    if gate_batch < full_inputs.shape[0]:
        prepared.inputs = full_inputs[:gate_batch].detach().requires_grad_(full_inputs.requires_grad)
    # The reference ran under the same seed: dropout draws the same mask in float32 and float64.
    torch.manual_seed(seed + 2)
    start = time.perf_counter()
    try:
        if mode == "training":
            out, grads = prepared.forward_backward()
        else:
            out, grads = prepared.forward(), []
        sync()
    finally:
        if prepared.inputs is not full_inputs:  # the timed steps run the whole batch
            prepared.inputs, prepared._loss_target = full_inputs, None
    return out, grads, time.perf_counter() - start


def gate_errors(out: torch.Tensor, grads: list[torch.Tensor], group: GroupState) -> tuple[float, float | None]:
    """Relative errors of a first call's output and gradients against the group's float64 reference."""
    return _errors(out, grads, group.ref_out, group.ref_grad)


def _errors(out: torch.Tensor, grads: list[torch.Tensor], ref_out: torch.Tensor, ref_grad: torch.Tensor | None
            ) -> tuple[float, float | None]:
    error = relative_error(out.float(), ref_out)
    return error, relative_error(_flat(grads), ref_grad) if ref_grad is not None else None


def over_tolerance(error: float, grad_error: float | None, tolerance: float | None,
                   grad_tolerance: float | None) -> list[str]:
    """What is over its tolerance, one phrase each (no tolerance: not judged)."""
    return [f"{what} relative error {err:.3e} > {tol:.1e}"
            for what, err, tol in (("output", error, tolerance), ("gradients", grad_error, grad_tolerance))
            if err is not None and tol is not None and not err <= tol]


def gate_rule(tol_dtype: str, eager_ok: bool) -> str:
    """The rule a variant's tolerance came from, for its failure's reason."""
    if not eager_ok:
        return "fixed table, eager failed its own bound"
    if tol_dtype in ACCURACY_FLOOR:
        return f"{ACCURACY_MULTIPLIER:g}x eager's error + floor"
    return f"fixed table or {ACCURACY_MULTIPLIER:g}x eager's error scaled to {tol_dtype}'s unit roundoff"


def group_state(entry: Entry, mode: str, batch: int, device: torch.device, bench_shape: bool, seed: int,
                tol_dtype: str, stages: Stages, gate_batch: int, sync: Callable[[], None]) -> GroupState:
    """Build the float64 reference (on the first ``gate_batch`` samples) and the eager cell of a group, and
    gate eager against its own bound (``tol_dtype``'s)."""
    # A block's input comes from earlier layers and needs its gradient; a network's input is data.
    input_requires_grad = entry.kind == "block"
    stages.enter("float64 reference")
    torch.manual_seed(seed)
    with torch.device(device):
        model = entry.create()
    x = entry.example_input(batch, bench=bench_shape, device=device, generator=torch.Generator().manual_seed(seed + 1))
    torch.manual_seed(seed + 2)
    ref_out, ref_grads = _reference(model, x[:gate_batch], mode, input_requires_grad, seed)
    ref_out = ref_out.to("cpu")
    ref_grad = _flat(ref_grads) if ref_grads else None
    del ref_grads

    stages.enter("eager first call")
    eager = EAGER.apply(model, x, mode, input_requires_grad=input_requires_grad, seed=seed)
    out, grads, first_call_s = first_call(eager, mode, seed, sync, gate_batch)
    stages.enter("correctness gate")
    error, grad_error = _errors(out, grads, ref_out, ref_grad)
    del out, grads
    eager.zero_grad()
    bounds = EAGER_SANITY_TOLERANCE.get(tol_dtype)
    failures = over_tolerance(error, grad_error, *bounds) if bounds is not None else []
    failure = (f"{'; '.join(failures)} ({tol_dtype}, eager's own bound) against the float64 reference"
               if failures else None)
    return GroupState(ref_out, ref_grad, error, grad_error, None if failure else eager, failure, first_call_s,
                      gate_batch=gate_batch)


def eager_gate(name: str, mode: str, batch: int, device: torch.device | str = "cpu", *, bench_shape: bool,
               seed: int = 0) -> GroupState:
    """Eager float32 of one group against its float64 reference and its own bound (what a group's first cell
    does before any variant): ``eager_failure`` is None when eager passes."""
    entry = get_entry(name)
    device = torch.device(device)
    return group_state(entry, mode, batch, device, bench_shape, seed, tolerance_dtype(EAGER, device), Stages(),
                       batch, synchronizer(device))
