"""What a step keeps alive, tensor by tensor, predicted without running it: ``perfkit memory NAME ...``.

The cell's model, input and optimizer are built under ``FakeTensorMode`` (tensors with shapes, dtypes,
strides and storages, but no data and no arithmetic), one untracked step allocates what every later step
reuses (SGD's momentum buffers), and a second step runs under torch's ``MemTracker``
(``torch.distributed._tools.mem_tracker``), a dispatch mode that sees every tensor storage created, kept
and freed, and files it under a category:

======================  =============================================================================
category                what
======================  =============================================================================
``parameters``          ``nn.Parameter`` storages
``buffers``             module buffers (BatchNorm's running statistics)
``gradients``           parameters' ``.grad``
``activations``         tensors created in the forward pass, live at that moment (saved for backward,
                        or the output)
``temporaries``         tensors created in the backward pass (activation gradients, scratch)
``optimizer_state``     SGD's momentum buffers
``inputs``              the step's input batch and other tensors the step was handed
======================  =============================================================================

Because no kernel runs, nothing the machine chooses enters the figures: not oneDNN's or cuDNN's scratch
space (it depends on the ISA, the thread count and the algorithm picked), not the caching allocator's
blocks. For a given torch version, entry, variant, mode and batch the prediction is the same on every
machine, which is what a CI gate needs (``perfkit.baseline``). What it leaves out is exactly what separates
it from a measured peak: library workspaces and allocator rounding beyond 512-byte blocks on CUDA.

``compile`` variants are predicted as the eager module they compile (the tracker cannot see inside an
inductor graph, which usually keeps less); the prediction says so in ``method``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from perfkit.registry import get_entry
from perfkit.variants import MODES, Variant, parse_variant

CATEGORIES = ("parameters", "buffers", "gradients", "activations", "temporaries", "optimizer_state", "inputs")
_TRACKER_NAMES = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients", "Activation":
                  "activations", "Temp": "temporaries", "Optstate": "optimizer_state", "Other": "inputs"}
METHOD = "torch MemTracker under FakeTensorMode (tensor storages; no kernel workspaces)"
TOP_MODULES = 10


class MemoryModelUnavailable(RuntimeError):
    """This torch has no usable tensor-level tracker; the message says why."""


@dataclass(frozen=True)
class ModuleMemory:
    """One module's share of a step."""

    name: str
    """Qualified name (the root module is its class name)."""
    activation_bytes: int
    """Bytes its forward pass created and left alive when it returned (kept for backward, or its output)."""
    peak_bytes: int
    """Highest total (every category) seen while it ran, forward or backward."""


@dataclass
class MemoryPrediction:
    """A step's predicted memory; every figure in bytes."""

    block: str
    variant: str
    mode: str
    batch: int
    input_shape: list[int]
    device: str
    method: str
    before_step_bytes: int
    """Live when the step starts: parameters, buffers, optimizer state, the input."""
    peak_bytes: int
    """Highest total live at once during the step."""
    at_peak: dict[str, int]
    """Each category's bytes at the moment of the peak (they add up to ``peak_bytes``)."""
    category_peaks: dict[str, int]
    """Each category's own highest value during the step (not simultaneous)."""
    modules: list[ModuleMemory] = field(default_factory=list)
    """The modules keeping the most activation bytes, largest first."""
    notes: list[str] = field(default_factory=list)

    @property
    def peak_rise_bytes(self) -> int:
        """Peak above what was live before the step: what the step itself costs."""
        return self.peak_bytes - self.before_step_bytes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the record's ``predicted_memory``)."""
        return {**asdict(self), "peak_rise_bytes": self.peak_rise_bytes}


def _tracker_class() -> type:
    """MemTracker with each category's own peak kept too; MemoryModelUnavailable where torch lacks it."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as error:  # a torch built without distributed, or older than 2.5
        raise MemoryModelUnavailable(f"torch {torch.__version__} has no torch.distributed._tools.mem_tracker "
                                     f"({error}); the memory model needs torch >= 2.5 with distributed") from None
    if not hasattr(MemTracker, "_update_peak_stats") or not hasattr(MemTracker(), "_curr_mem_snap"):
        raise MemoryModelUnavailable(f"torch {torch.__version__}'s MemTracker lacks _update_peak_stats / "
                                     "_curr_mem_snap, which perfkit reads for per-category peaks")

    class CategoryPeakTracker(MemTracker):
        """Keeps each category's own peak too; with ``per_module=False`` skips the per-module peaks, whose
        update walks every module on every op (a 24-layer dense block: 1.3 s instead of ~0.2 s)."""

        def __init__(self, per_module: bool = True) -> None:
            super().__init__()
            self.per_module = per_module
            self.category_peaks: dict[str, int] = {}

        def _update_peak_stats(self, peak_state: Any) -> None:
            if self.per_module:
                super()._update_peak_stats(peak_state)
            else:  # the global half of MemTracker._update_peak_stats
                for dev, snap in self._curr_mem_snap.items():
                    if self._peak_mem.get(dev, 0) < snap["Total"]:
                        self._peak_mem[dev] = snap["Total"]
                        self._peak_mem_snap[dev] = dict(snap)
            for snap in self._curr_mem_snap.values():
                for key, value in snap.items():
                    name = getattr(key, "value", key)
                    if value > self.category_peaks.get(name, 0):
                        self.category_peaks[name] = value

    return CategoryPeakTracker


def _by_category(snapshot: dict, device: torch.device) -> dict[str, int]:
    snap = next((v for k, v in snapshot.items() if torch.device(k).type == device.type), {})
    out = dict.fromkeys(CATEGORIES, 0)
    for key, value in snap.items():
        name = _TRACKER_NAMES.get(getattr(key, "value", key))
        if name is not None:
            out[name] += value
    return out


def _total(snapshot: dict, device: torch.device) -> int:
    return sum(_by_category(snapshot, device).values())


def _modules(tracker: Any, top: int) -> list[ModuleMemory]:
    rows = []
    for stats in tracker.memory_tracking.values():
        snaps = stats.snapshots
        pre, post = snaps.get(_state("PRE_FW")), snaps.get(_state("POST_FW"))
        if not pre or not post:
            continue
        act = lambda snap: sum(v for s in snap.values() for k, v in s.items()  # noqa: E731
                               if getattr(k, "value", k) == "Activation")
        peaks = [sum(v for k, v in s.items() if getattr(k, "value", k) == "Total")
                 for state in ("PEAK_FW", "PEAK_BW") for snap in snaps.get(_state(state), []) for s in snap.values()]
        rows.append(ModuleMemory(stats.mod_fqn, act(post[0]) - act(pre[0]), max(peaks, default=0)))
    rows.sort(key=lambda m: (-m.activation_bytes, m.name))
    return rows[:top]


def _state(name: str) -> Any:
    from torch.distributed._tools.mem_tracker import _ModState

    return getattr(_ModState, name)


def _validate(name: str, variant: Variant, mode: str, batch: int, shape: tuple[int, ...] | None) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch {batch!r} must be a positive integer")
    entry = get_entry(name)
    if shape is not None and len(shape) != len(entry.test_shape):
        raise ValueError(f"shape {','.join(map(str, shape))} has {len(shape)} dimension(s); {name} takes "
                         f"{len(entry.test_shape)} (C,H,W), e.g. {','.join(map(str, entry.bench_shape))}")
    if shape is not None and any(s < 1 for s in shape):
        raise ValueError(f"shape {','.join(map(str, shape))}: every dimension must be positive")


def _to_channels_last(model: nn.Module) -> nn.Module:
    """What ``model.to(memory_format=torch.channels_last)`` does (4-d parameters and buffers), done by
    replacing them: ``Module.to`` swaps tensors in place, which fake tensors refuse."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None and t.dim() == 4:
                    converted = t.detach().contiguous(memory_format=torch.channels_last)
                    store[key] = nn.Parameter(converted, t.requires_grad) if isinstance(t, nn.Parameter) else converted
    return model


def default_prediction_device() -> str:
    """cuda where a GPU is present, else cpu (the same storages, without CUDA's rounding)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def predict_step_memory(name: str, variant: str | Variant = "eager", mode: str = "training", batch: int = 8, *,
                        shape: tuple[int, ...] | None = None, bench_shape: bool = True,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        top_modules: int = TOP_MODULES, seed: int = 0,
                        overrides: dict[str, Any] | None = None) -> MemoryPrediction:
    """Predict one step of a matrix cell (``variant`` applied to entry ``name``) without allocating memory.

    ``shape`` (C,H,W) overrides the entry's benchmark shape (``bench_shape=True``) or test shape. ``dtype``
    converts the model and input (the correctness gate's float64 reference is ``dtype=torch.float64``).
    ``device`` matters only for the allocator's rounding (CUDA rounds each storage up to 512 bytes); no GPU
    is needed. ``overrides`` are the entry's keyword overrides (``num_layers=8``). Raises ValueError for a bad
    argument, MemoryModelUnavailable where torch has no tracker.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    requested = variant = parse_variant(variant)
    _validate(name, variant, mode, batch, shape)
    tracker_class = _tracker_class()
    entry = get_entry(name)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        # Fake CUDA tensors need a CUDA context in backward (torch 2.11 and 2.13 alike).
        raise ValueError("predicting for cuda needs a CUDA GPU here (fake CUDA tensors still open a context); "
                         "predict for device cpu: the same storages, without CUDA's 512-byte rounding")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device.type!r}: the memory model predicts for cpu or cuda")
    shape = tuple(shape) if shape is not None else (entry.bench_shape if bench_shape else entry.test_shape)
    notes = []
    if variant.compiled:
        notes.append(f"{variant.name} predicted as its eager module: the tracker cannot see inside a compiled graph")
        variant = variant.uncompiled()
    # allow_non_fake_inputs: constants made inside the model's code (a torch.tensor(...) in a forward) stay real.
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device(device):
        torch.manual_seed(seed)
        # Built in ``dtype`` rather than converted: Module.to swaps fake parameters, which the fake mode forbids.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = entry.create(**(overrides or {}))
        finally:
            torch.set_default_dtype(default_dtype)
        x = torch.empty((batch, *shape), dtype=dtype)
        if variant.channels_last:
            model, x = _to_channels_last(model), x.contiguous(memory_format=torch.channels_last)
            variant = replace(variant, channels_last=False)
        prepared = variant.apply(model, x, mode, input_requires_grad=entry.kind == "block", seed=seed)
        if mode == "training":
            prepared.step()  # allocates what every later step reuses: SGD's momentum, the loss target
        tracker = tracker_class(per_module=top_modules > 0)
        extra = [t for t in (prepared._loss_target,) if t is not None]
        tracker.track_external(prepared.module, *([prepared.optimizer] if prepared.optimizer else []),
                               prepared.inputs, *extra)
        before = tracker.get_tracker_snapshot("current")
        with tracker:
            prepared.step()
        peak = tracker.get_tracker_snapshot("peak")
    at_peak = _by_category(peak, device)
    before_total = _total(before, device)
    category_peaks = dict.fromkeys(CATEGORIES, 0)
    for key, value in tracker.category_peaks.items():
        if key in _TRACKER_NAMES:
            category_peaks[_TRACKER_NAMES[key]] = max(category_peaks[_TRACKER_NAMES[key]], value)
    for category, value in _by_category(before, device).items():
        category_peaks[category] = max(category_peaks[category], value)
    return MemoryPrediction(
        block=name, variant=requested.name,
        mode=mode, batch=batch, input_shape=[batch, *shape], device=device.type, method=METHOD,
        before_step_bytes=before_total, peak_bytes=max(sum(at_peak.values()), before_total), at_peak=at_peak,
        category_peaks=category_peaks, modules=_modules(tracker, top_modules), notes=notes)


REFERENCE_HEADROOM = 0.9
"""Share of free memory the float64 reference may be predicted to fill: the prediction leaves out library
workspaces and allocator rounding, so a reference predicted at 100% would likely run out."""


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a cell could still allocate on ``device``: CUDA's free memory plus what the caching allocator
    holds unused; on Linux the kernel's MemAvailable. None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class MemoryPlan:
    """What a cell may allocate, decided from predictions before it allocates anything."""

    variant: MemoryPrediction
    free_bytes: int | None
    gate_batch: int
    """The batch the float64 reference runs at: the cell's, or the largest predicted to fit."""
    reference_peak_bytes: int | None
    """The float64 reference's predicted peak at ``gate_batch`` (at batch 1 when none fits); None where twice
    eager's float32 peak fitted, which bounds it from above."""

    @property
    def variant_fits(self) -> bool:
        """False only when the step is sure to run out: the prediction is a lower bound (no workspaces)."""
        return self.free_bytes is None or self.variant.peak_bytes <= self.free_bytes


@functools.lru_cache(maxsize=256)
def _cached_prediction(name: str, variant: str, mode: str, batch: int, bench_shape: bool, device: str, dtype: str,
                       seed: int) -> MemoryPrediction:
    """:func:`predict_step_memory` once per cell's parameters: the variants of a group share its reference,
    and a compiled variant predicts as its eager module. Registering a block again under a name already
    predicted is not seen (the registry refuses a second registration)."""
    variant_parsed = parse_variant(variant)
    if variant_parsed.compiled:
        eager_module = variant_parsed.uncompiled()
        base = _cached_prediction(name, eager_module.name, mode, batch, bench_shape, device, dtype, seed)
        return replace(base, variant=variant_parsed.name, notes=[
            *base.notes, f"{variant_parsed.name} predicted as its eager module: the tracker cannot see inside a "
            "compiled graph"])
    return predict_step_memory(name, variant_parsed, mode, batch, bench_shape=bench_shape, device=device,
                               dtype=getattr(torch, dtype), top_modules=0, seed=seed)


def plan_cell_memory(name: str, variant: str | Variant, mode: str, batch: int, *, bench_shape: bool,
                     device: torch.device | str, seed: int = 0,
                     free_bytes: int | None = None) -> MemoryPlan:
    """Predict the variant's step and the float64 reference, and pick the gate's batch (``free_bytes``
    defaults to :func:`free_memory_bytes`)."""
    device = torch.device(device)
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    where = "cuda" if device.type == "cuda" else "cpu"
    predicted = _cached_prediction(name, parse_variant(variant).name, mode, batch, bench_shape, where, "float32",
                                   seed)

    def reference(b: int) -> int:
        # The float64 copy runs while the float32 model and its input are live.
        return _cached_prediction(name, "eager", mode, b, bench_shape, where, "float64", seed).peak_bytes

    def fits(b: int) -> bool:
        return reference(b) + predicted.before_step_bytes <= REFERENCE_HEADROOM * free

    # Every floating tensor of the float64 copy is twice its float32 size (integer targets stay), so twice
    # eager's float32 peak bounds the reference from above: where that fits, no float64 prediction is needed.
    eager = _cached_prediction(name, "eager", mode, batch, bench_shape, where, "float32", seed)
    if free is None or 2 * eager.peak_bytes + predicted.before_step_bytes <= REFERENCE_HEADROOM * free:
        return MemoryPlan(predicted, free, batch, None)
    gate_batch = largest_fitting_batch(fits, batch)
    return MemoryPlan(predicted, free, gate_batch, reference(max(gate_batch, 1)))


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units, as allocators count)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def render(prediction: MemoryPrediction) -> str:
    """The prediction as the plain-text tables ``perfkit memory`` prints."""
    p = prediction
    lines = [f"{p.block} {p.variant} {p.mode} batch {p.batch}, input {'x'.join(map(str, p.input_shape))} "
             f"({p.device}; {p.method})", ""]
    width = max(map(len, CATEGORIES))
    lines.append(f"{'category':<{width}}  {'at peak':>12}  {'own peak':>12}")
    for category in CATEGORIES:
        lines.append(f"{category:<{width}}  {format_bytes(p.at_peak[category]):>12}  "
                     f"{format_bytes(p.category_peaks[category]):>12}")
    lines += [f"{'peak':<{width}}  {format_bytes(p.peak_bytes):>12}",
              f"{'before the step':<{width}}  {format_bytes(p.before_step_bytes):>12}",
              f"{'peak rise':<{width}}  {format_bytes(p.peak_rise_bytes):>12}", ""]
    if p.modules:
        name_width = max(len("module"), *(len(m.name) for m in p.modules))
        lines.append(f"{'module':<{name_width}}  {'activations':>12}  {'peak while running':>18}")
        for m in p.modules:
            lines.append(f"{m.name:<{name_width}}  {format_bytes(m.activation_bytes):>12}  "
                         f"{format_bytes(m.peak_bytes):>18}")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def largest_fitting_batch(fits: Any, batch: int) -> int:
    """The largest b in [1, batch] with ``fits(b)`` true (0 if none), by bisection on a monotone predicate."""
    if fits(batch):
        return batch
    low, high = 0, batch  # fits(low) (vacuously for 0), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low

