"""The correctness gate: a cell is checked against a float64 reference on several inputs before it is timed,
and on a fresh one after.

The model is built under a fixed seed; once per (entry, mode, batch) group a float64 copy runs each of the
gate's inputs (:func:`gate_input_seeds`: the timed input first, then others from their own seeds) and, when
the group's first cell has been timed, the input checked after timing (:func:`recheck_seed`), under each
input's own dropout seed (inference: the
output; training: the output and every gradient after one forward and backward), and so does eager float32
(:class:`GroupState`, shared by the group's variants through a :class:`GroupCache`). Relative errors
``‖a − ref‖/‖ref‖``: eager is held to its own sanity bound, a float32 variant to a multiple of eager's
error on the same input plus a floor (the dynamo harness's rule), reduced precision to its table or eager's
error scaled to its unit roundoff (``perfkit.testing.gate_tolerance``). A cell over tolerance on any input
is ``failed`` and is not timed, so it can never read as a speedup. The gate's first call is the variant's
first call, so for a compiled variant it is the compile time.

Several inputs catch a variant that answers every call with its first output (a stale cache); the check
after timing, on an input the variant has never seen, catches one that turns stale or cached only after
warm-up, or whose timed steps broke its state. In training the parameters are first set back to the
gate's (the timed SGD steps moved them), so that check is of the computation, not of the weights' drift.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from perfkit.measure.stages import Stages
from perfkit.measure.timing import synchronizer
from perfkit.registry import Entry, get_entry
from perfkit.testing import (
    ACCURACY_FLOOR,
    ACCURACY_MULTIPLIER,
    EAGER_SANITY_TOLERANCE,
    GRAD_REL_TOLERANCE,
    REL_TOLERANCE,
    gate_tolerance,
    relative_error,
)
from perfkit.variants import Prepared, Variant, gradients, loss_target, parse_variant, training_loss

EAGER = parse_variant("eager")

GATE_SEEDS = 3
"""Inputs the gate checks each variant on before timing: the timed input and two more of their own seeds."""
INPUT_SEED_STRIDE = 7919
"""The distance between the seeds of a cell's inputs: input ``s`` draws its data from ``s + 1`` and its
dropout from ``s + 2``, so no two inputs share a stream."""


def tolerance_dtype(variant: Variant, device: torch.device | str) -> str:
    """The tolerance table's key for ``variant`` on ``device``: its compute dtype, or tf32 where allowed."""
    dtype = variant.compute_dtype
    if dtype == "float32" and torch.device(device).type == "cuda" and (
        torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    ):
        return "tf32"
    return dtype


def gate_input_seeds(seed: int, count: int = GATE_SEEDS) -> list[int]:
    """The seeds of the gate's ``count`` inputs: the timed input's (``seed``) first."""
    if count < 1:
        raise ValueError(f"the gate needs at least one input (the timed one), got {count}")
    return [seed + k * INPUT_SEED_STRIDE for k in range(count)]


def recheck_seed(seed: int, count: int = GATE_SEEDS) -> int:
    """The seed of the input checked after timing: none of the gate's ``count`` inputs, so never seen before."""
    return seed + count * INPUT_SEED_STRIDE


def _input(entry: Entry, batch: int, bench_shape: bool, input_seed: int, gate_batch: int, timed: bool) -> torch.Tensor:
    """Input ``input_seed`` at the gate's batch, on the CPU: the timed input's first samples (as its cells draw
    it), or a fresh input drawn at the gate's batch."""
    generator = torch.Generator().manual_seed(input_seed + 1)
    if timed:
        return entry.example_input(batch, bench=bench_shape, generator=generator)[:gate_batch].clone()
    return entry.example_input(gate_batch, bench=bench_shape, generator=generator)


def _reference(reference: nn.Module, x: torch.Tensor, mode: str, input_requires_grad: bool, seed: int,
               input_seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float64 model's output (and flattened gradients, in training) on ``x``, under the input's dropout
    seed and the cell's loss target; on the CPU."""
    training = mode == "training"
    x64 = x.detach().to(torch.float64).requires_grad_(training and input_requires_grad)
    torch.manual_seed(input_seed + 2)
    if not training:
        with torch.no_grad():
            return reference(x64).to("cpu"), None
    for p in reference.parameters():
        p.grad = None
    out = reference(x64)
    training_loss(out, loss_target(out, seed)).backward()
    return out.detach().to("cpu"), _flat(gradients(list(reference.parameters()), x64))


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])


BEFORE_TIMING = "before timing"
"""A check of the gate, on one of its inputs: a cell that fails one is never timed."""
AFTER_TIMING = "after timing"
"""The check on a fresh input after the timed rounds: a cell that fails it is ``failed``, its rounds unranked."""


@dataclass
class Reference:
    """One input the gate checks: its seed, the input (on the CPU, at the gate's batch), the float64 reference's
    answer on it, and eager float32's error there (the calibrated tolerance's yardstick on that input)."""

    input_seed: int
    inputs: torch.Tensor
    out: torch.Tensor
    grad: torch.Tensor | None
    eager_error: float = math.nan
    eager_grad_error: float | None = None


@dataclass
class GateCheck:
    """A variant's errors on one input against the float64 reference, and the tolerances they are held to."""

    input_seed: int
    when: str
    """:data:`BEFORE_TIMING` (the gate's inputs) or :data:`AFTER_TIMING` (the fresh input)."""
    rel_error: float
    grad_rel_error: float | None
    tolerance: float | None = None
    grad_tolerance: float | None = None

    def failures(self) -> list[str]:
        """What is over its tolerance, one phrase each."""
        return over_tolerance(self.rel_error, self.grad_rel_error, self.tolerance, self.grad_tolerance)


@dataclass
class GroupState:
    """What the variants of one (entry, mode, batch) group share: computed once, by the group's first cell.

    The float64 reference on each of the gate's inputs (same seed and model for every variant), and on the
    input checked after timing once a cell needs it, eager float32's error on each (the calibrated gate's
    yardstick), the eager cell itself, prepared and kept warm to be timed beside each variant, the initial
    parameters (training: what the check after timing sets a cell's parameters back to), and the FLOP count
    (of the eager step, the same for every variant).
    """

    references: list[Reference]
    """The gate's inputs, the timed input first."""
    eager: Prepared | None
    """None when eager failed its own gate (``eager_failure`` says why): its variants are timed unpaired."""
    eager_failure: str | None
    eager_first_call_s: float
    eager_checks: list[GateCheck] = field(default_factory=list)
    """Eager's own checks on the gate's inputs, against its sanity bound."""
    initial_parameters: list[torch.Tensor] = field(default_factory=list)
    """Training: the parameters as built, on the CPU, in the reference's order; empty in inference."""
    eager_warm: bool = False
    flops: int | None = None
    gate_batch: int | None = None
    """The batch the reference (and so every variant's gate) ran at: the cell's, or the largest that fits."""
    make_fresh: Callable[[], Reference] | None = None
    """Builds the input checked after timing; called once, by the group's first cell that gets that far."""
    _fresh: Reference | None = None

    def fresh(self) -> Reference:
        """The input checked after timing, which no call before the timed steps has seen, with its reference."""
        if self._fresh is None:
            self._fresh = self.make_fresh()
        return self._fresh

    @property
    def eager_error(self) -> float:
        """Eager float32's output error on the timed input."""
        return self.references[0].eager_error

    @property
    def eager_grad_error(self) -> float | None:
        """Eager float32's gradient error on the timed input (training)."""
        return self.references[0].eager_grad_error


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



def gate_call(prepared: Prepared, mode: str, input_seed: int, sync: Callable[[], None], inputs: torch.Tensor
              ) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """One call of the variant for the gate on ``inputs`` (any device), laid out as the variant lays out its own
    input (memory format, dtype, device, ``requires_grad``), under the input's dropout seed: (output,
    gradients, seconds it took). The variant's own input, the one its timed steps run, is put back after."""
    own = prepared.inputs
    prepared.inputs = torch.empty_like(own.detach()[: inputs.shape[0]]).copy_(inputs).requires_grad_(own.requires_grad)
    # The reference ran under the same seed: dropout draws the same mask in float32 and float64.
    torch.manual_seed(input_seed + 2)
    start = time.perf_counter()
    try:
        if mode == "training":
            out, grads = prepared.forward_backward()
        else:
            out, grads = prepared.forward(), []
        sync()
    finally:
        # The loss target is drawn for the output's shape: the timed steps draw their own.
        prepared.inputs, prepared._loss_target = own, None
    return out, grads, time.perf_counter() - start


def check_on(prepared: Prepared, mode: str, reference: Reference, sync: Callable[[], None],
             when: str = BEFORE_TIMING) -> tuple[GateCheck, float]:
    """The variant's errors on ``reference``'s input (tolerances not yet set), and the seconds its call took."""
    out, grads, seconds = gate_call(prepared, mode, reference.input_seed, sync, reference.inputs)
    error, grad_error = _errors(out, grads, reference.out, reference.grad)
    del out, grads
    prepared.zero_grad()
    return GateCheck(reference.input_seed, when, error, grad_error), seconds


def recheck(prepared: Prepared, group: GroupState, mode: str, sync: Callable[[], None]) -> GateCheck:
    """The variant on the group's fresh input after its timed steps; in training its parameters are first set
    back to the gate's (the timed SGD steps moved them; the reference has the initial ones)."""
    if group.initial_parameters:
        with torch.no_grad():
            for parameter, initial in zip(prepared.parameters, group.initial_parameters, strict=True):
                parameter.copy_(initial)
    return check_on(prepared, mode, group.fresh(), sync, AFTER_TIMING)[0]


def set_tolerances(checks: list[GateCheck], group: GroupState, tol_dtype: str, mode: str, eager_itself: bool) -> None:
    """Set each check's tolerances: eager's own bound for the eager cell, else the calibrated rule from eager's
    error on the same input (``perfkit.testing.gate_tolerance``); gradients are judged in training only."""
    eager_ok = group.eager is not None
    by_seed = {r.input_seed: r for r in group.references}
    for check in checks:
        if eager_itself:
            tolerance, grad_tolerance = EAGER_SANITY_TOLERANCE.get(
                tol_dtype, (REL_TOLERANCE[tol_dtype], GRAD_REL_TOLERANCE[tol_dtype]))
        else:
            reference = group.fresh() if check.when == AFTER_TIMING else by_seed[check.input_seed]
            tolerance = gate_tolerance(tol_dtype, reference.eager_error if eager_ok else None)
            grad_tolerance = gate_tolerance(tol_dtype, reference.eager_grad_error if eager_ok else None,
                                            gradients=True)
        check.tolerance = tolerance
        check.grad_tolerance = grad_tolerance if mode == "training" else None


def verdict(checks: list[GateCheck], rule: str) -> str | None:
    """Why the first check over its tolerance fails the cell, naming the input and the ``rule`` its tolerance
    came from; None when every check passed."""
    before = [c for c in checks if c.when == BEFORE_TIMING]
    for check in checks:
        failures = check.failures()
        if not failures:
            continue
        if check.when == AFTER_TIMING:
            where = (f"after timing, on a fresh input (seed {check.input_seed}): the variant's output went stale or "
                     "depends on state kept across calls")
        else:
            index = before.index(check)
            where = (f"on gate input {index + 1} of {len(before)} (seed {check.input_seed}"
                     + (", the timed input)" if index == 0 else ")"))
        return f"{'; '.join(failures)} ({rule}) against the float64 reference, {where}"
    return None


def check_fields(checks: list[GateCheck]) -> dict[str, Any]:
    """The record's gate fields: the timed input's errors and tolerances (the first check, the variant's first
    call), and every check (``gate_checks``)."""
    first = checks[0]
    return dict(rel_error=first.rel_error, grad_rel_error=first.grad_rel_error, tolerance=first.tolerance,
                grad_tolerance=first.grad_tolerance, gate_checks=[dataclasses.asdict(c) for c in checks])



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


def gate_rule(tol_dtype: str, eager_ok: bool, eager_itself: bool = False) -> str:
    """The rule a cell's tolerance came from (``tol_dtype`` first), for its failure's reason."""
    if eager_itself:
        return f"{tol_dtype}, eager's own bound"
    return f"{tol_dtype}: {_variant_rule(tol_dtype, eager_ok)}"


def _variant_rule(tol_dtype: str, eager_ok: bool) -> str:
    if not eager_ok:
        return "fixed table, eager failed its own bound"
    if tol_dtype in ACCURACY_FLOOR:
        return f"{ACCURACY_MULTIPLIER:g}x eager's error + floor"
    return f"fixed table or {ACCURACY_MULTIPLIER:g}x eager's error scaled to {tol_dtype}'s unit roundoff"


def _model(entry: Entry, seed: int, device: torch.device) -> nn.Module:
    """The entry's model as every cell of the group builds it: under ``seed``, on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        return entry.create()


def _float64_references(model: nn.Module, entry: Entry, mode: str, batch: int, device: torch.device,
                        bench_shape: bool, seed: int, gate_batch: int, input_seeds: list[int]) -> list[Reference]:
    """A float64 copy of ``model`` on each input of ``input_seeds`` (the cell's ``seed`` is the timed input)."""
    float64 = copy.deepcopy(model).to(torch.float64)
    float64.train(mode == "training")
    references = []
    for input_seed in input_seeds:
        x = _input(entry, batch, bench_shape, input_seed, gate_batch, timed=input_seed == seed)
        references.append(Reference(input_seed, x, *_reference(float64, x.to(device), mode, entry.kind == "block",
                                                               seed, input_seed)))
    return references


def _eager_checks(eager: Prepared, mode: str, references: list[Reference], sync: Callable[[], None],
                  stages: Stages) -> tuple[list[GateCheck], float]:
    """Eager on each reference's input, its errors kept on the reference (its variants' yardstick there); the
    checks and the seconds of the first call."""
    first, first_call_s = check_on(eager, mode, references[0], sync)
    stages.enter("correctness gate")
    checks = [first] + [check_on(eager, mode, r, sync)[0] for r in references[1:]]
    for reference, check in zip(references, checks, strict=True):
        reference.eager_error, reference.eager_grad_error = check.rel_error, check.grad_rel_error
    return checks, first_call_s


def _fresh_reference(entry: Entry, mode: str, batch: int, device: torch.device, bench_shape: bool, seed: int,
                     gate_batch: int, input_seed: int, sync: Callable[[], None]) -> Reference:
    """The input checked after timing, from a model built afresh (nothing the timed steps did leaks in): its
    float64 reference and eager float32's error on it."""
    model = _model(entry, seed, device)
    (reference,) = _float64_references(model, entry, mode, batch, device, bench_shape, seed, gate_batch,
                                       [input_seed])
    eager = EAGER.apply(model, reference.inputs.to(device), mode, input_requires_grad=entry.kind == "block", seed=seed)
    _eager_checks(eager, mode, [reference], sync, Stages())
    return reference


def group_state(entry: Entry, mode: str, batch: int, device: torch.device, bench_shape: bool, seed: int,
                tol_dtype: str, stages: Stages, gate_batch: int, sync: Callable[[], None],
                gate_seeds: int = GATE_SEEDS) -> GroupState:
    """Build the float64 references (on the first ``gate_batch`` samples of the timed input and ``gate_seeds``
    - 1 other inputs) and the eager cell of a group, and gate eager against its own bound (``tol_dtype``'s) on
    them. The input checked after timing is built when a cell first needs it (:meth:`GroupState.fresh`)."""
    stages.enter("float64 reference")
    model = _model(entry, seed, device)
    references = _float64_references(model, entry, mode, batch, device, bench_shape, seed, gate_batch,
                                     gate_input_seeds(seed, gate_seeds))
    initial = [p.detach().to("cpu", copy=True) for p in model.parameters()] if mode == "training" else []

    stages.enter("eager first call")
    x = entry.example_input(batch, bench=bench_shape, device=device, generator=torch.Generator().manual_seed(seed + 1))
    # A block's input comes from earlier layers and needs its gradient; a network's input is data.
    eager = EAGER.apply(model, x, mode, input_requires_grad=entry.kind == "block", seed=seed)
    checks, first_call_s = _eager_checks(eager, mode, references, sync, stages)
    state = GroupState(references, eager, None, first_call_s, checks, initial, gate_batch=gate_batch,
                       make_fresh=functools.partial(_fresh_reference, entry, mode, batch, device, bench_shape, seed,
                                                    gate_batch, recheck_seed(seed, gate_seeds), sync))
    set_tolerances(checks, state, tol_dtype, mode, eager_itself=True)
    if tol_dtype in EAGER_SANITY_TOLERANCE:
        state.eager_failure = verdict(checks, gate_rule(tol_dtype, True, eager_itself=True))
    if state.eager_failure:
        state.eager = None
    return state


def eager_gate(name: str, mode: str, batch: int, device: torch.device | str = "cpu", *, bench_shape: bool,
               seed: int = 0, gate_seeds: int = GATE_SEEDS) -> GroupState:
    """Eager float32 of one group against its float64 references and its own bound (what a group's first cell
    does before any variant): ``eager_failure`` is None when eager passes on every gate input."""
    entry = get_entry(name)
    device = torch.device(device)
    return group_state(entry, mode, batch, device, bench_shape, seed, tolerance_dtype(EAGER, device), Stages(),
                       batch, synchronizer(device), gate_seeds)
