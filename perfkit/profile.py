"""``perfkit profile NAME --variant V --mode M``: a torch.profiler trace of a block's steps, in its own terms.

The trace is written by ``torch.profiler.tensorboard_trace_handler`` as ``<out>/<run>/<worker>.<ts>.pt.trace.json``:
the layout TensorBoard's PyTorch profiler plugin (torch-tb-profiler) lists as run ``<run>`` under
``tensorboard --logdir <out>``, and a Chrome trace JSON that https://ui.perfetto.dev opens as it is (the
plugin is no longer developed upstream; Perfetto is where its users went).

Each submodule's forward runs inside a ``record_function`` range named ``<stage>:<qualified name>``
(``conv:conv1``, ``bn:layers.0.norm1``, ``epilogue:epilogue``), and every ``torch.cat`` inside one inside
``concat:<module>``, installed with forward hooks and a ``TorchFunctionMode`` so the block's code is
untouched. Compiled variants get no stage ranges: inductor fuses across the stages, and its kernels in the
trace are named after the operations they fused.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, record_function, schedule, tensorboard_trace_handler

WAIT_STEPS, WARMUP_STEPS, ACTIVE_STEPS = 1, 2, 3
"""The profiler's schedule: steps skipped, steps profiled but discarded (the profiler's own warm-up), steps
recorded."""
TOP_OPERATORS = 20
TOP_RANGES = 20

STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("conv", ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d")),
    ("bn", ("BatchNorm1d", "BatchNorm2d", "SyncBatchNorm", "GroupNorm", "LayerNorm")),
    ("epilogue", ("ResidualEpilogue", "FusedResidualEpilogue")),
    ("act", ("ReLU", "ReLU6", "GELU", "SiLU", "Sigmoid")),
    ("pool", ("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d")),
    ("fc", ("Linear",)),
    ("dropout", ("Dropout",)),
)
"""Stage name of a module by its class name; any other module (a layer, a branch) is a ``module`` range."""
STAGE_NAMES = frozenset(stage for stage, _ in STAGES)


def stage_of(module: nn.Module) -> str:
    """The stage a module's forward belongs to, by its class: ``conv``, ``bn``, ``epilogue``, ... or ``module``."""
    name = type(module).__name__
    return next((stage for stage, names in STAGES if name in names), "module")


class _ConcatRanges(TorchFunctionMode):
    """Wraps every ``torch.cat`` in a ``concat:<innermost module>`` range."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat or func is torch.concat:
            name = f"concat:{self.stack[-1] if self.stack else 'block'}"
            self.seen.add(name)
            with record_function(name):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class StageRanges:
    """Context manager: ``record_function`` ranges around each submodule's forward and each concat."""

    def __init__(self, model: nn.Module, block_name: str) -> None:
        self.model = model
        self.block_name = block_name
        self.names: list[str] = []
        """Every range name installed (the trace holds those whose module ran)."""
        self.nested: set[str] = set()
        """Ranges inside another stage's range (the epilogue's BatchNorm): left out of the per-stage sums."""
        self._handles: list[Any] = []
        self._open: list[Any] = []
        self._stack: list[str] = []
        self._concat = _ConcatRanges(self._stack)

    def _pre(self, range_name: str, qualified: str, module: nn.Module, args: Any) -> None:
        scope = record_function(range_name)
        scope.__enter__()
        self._open.append(scope)
        self._stack.append(qualified)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._stack.pop()
        self._open.pop().__exit__(None, None, None)

    def __enter__(self) -> StageRanges:
        stages = {qualified: stage_of(module) for qualified, module in self.model.named_modules()}
        for qualified, module in self.model.named_modules():
            label = qualified or self.block_name
            range_name = f"block:{label}" if not qualified else f"{stages[qualified]}:{qualified}"
            self.names.append(range_name)
            parts = qualified.split(".")
            if any(stages.get(".".join(parts[:i]), "module") != "module" for i in range(1, len(parts))):
                self.nested.add(range_name)
            self._handles.append(module.register_forward_pre_hook(
                functools.partial(self._pre, range_name, label)))
            self._handles.append(module.register_forward_hook(self._post))
        self._concat.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._concat.__exit__(*exc)
        self.names += sorted(self._concat.seen - set(self.names))
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class ProfileResult:
    """Where ``profile_block`` wrote its trace and table, and the table itself."""

    run_dir: Path
    """TensorBoard's run folder (the name the plugin lists) under the ``--logdir``."""
    trace_path: Path
    table_path: Path
    table: str
    """Markdown: the top operators by self time, then the time per stage range."""
    range_names: list[str]


def _time(us: float) -> str:
    return f"{us / 1e3:.3f} ms" if us >= 1000 else f"{us:.1f} µs"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


_PYTHON_EVENT = re.compile(r"^<built-in |\.py\(\d+\): ")
"""Python-function events that ``with_stack`` adds: in the trace for its stacks, not operators."""


def _is_range(event: Any, range_names: set[str]) -> bool:
    return event.key in range_names or event.key.split(":", 1)[0] in {"concat", "block", "module", *STAGE_NAMES}


def operator_table(prof: torch.profiler.profile, range_names: list[str], on_cuda: bool, title: str,
                   nested: set[str] = frozenset()) -> str:
    """Markdown tables of the active steps: top operators by self time, time per stage, the longest ranges.

    ``nested`` names ranges that run inside another stage's range; the per-stage sums leave them out.
    """
    averages = prof.key_averages()
    ranges = set(range_names)

    def self_us(e: Any) -> float:
        return getattr(e, "self_device_time_total", 0.0) if on_cuda else e.self_cpu_time_total

    def total_us(e: Any) -> float:
        return getattr(e, "device_time_total", 0.0) if on_cuda else e.cpu_time_total

    def self_memory(e: Any) -> int:
        return getattr(e, "self_device_memory_usage", 0) if on_cuda else e.self_cpu_memory_usage

    where = "device" if on_cuda else "CPU"
    ops = [e for e in averages if not _is_range(e, ranges) and not e.key.startswith("ProfilerStep")
           and not _PYTHON_EVENT.search(e.key)]
    ops.sort(key=lambda e: (-self_us(e), e.key))
    lines = [f"# {title}", "",
             f"{ACTIVE_STEPS} profiled steps after {WAIT_STEPS} skipped and {WARMUP_STEPS} warm-up steps; times "
             f"are {where} time summed over the {ACTIVE_STEPS} steps, under the profiler (stacks and memory "
             "recorded), so read them as proportions, not as the step's time.", "",
             f"## Top {TOP_OPERATORS} operators by self {where} time", "",
             f"| operator | calls | self {where} | total {where} | self memory |", "|---|---:|---:|---:|---:|"]
    for e in ops[:TOP_OPERATORS]:
        lines.append(f"| `{e.key}` | {e.count} | {_time(self_us(e))} | {_time(total_us(e))} | "
                     f"{_mib(self_memory(e))} |")
    range_events = [e for e in averages if _is_range(e, ranges)]
    per_stage: dict[str, list[float]] = {}
    for e in range_events:
        stage = e.key.split(":", 1)[0]
        # block and module ranges contain the stages, nested ones sit inside one: either would count twice
        if stage not in ("block", "module") and e.key not in nested:
            calls_time = per_stage.setdefault(stage, [0, 0.0])
            calls_time[0] += e.count
            calls_time[1] += total_us(e)
    if per_stage:
        lines += ["", "## Time per stage", "",
                  "Forward ranges of every module of a stage (backward kernels run outside them, in autograd's "
                  "own ranges).", "", f"| stage | calls | total {where} |", "|---|---:|---:|"]
        for stage, (calls, us) in sorted(per_stage.items(), key=lambda kv: (-kv[1][1], kv[0])):
            lines.append(f"| {stage} | {calls} | {_time(us)} |")
    if range_events:
        range_events.sort(key=lambda e: (-total_us(e), e.key))
        lines += ["", f"## Longest {min(TOP_RANGES, len(range_events))} record_function ranges", "",
                  f"| range | calls | total {where} | memory |", "|---|---:|---:|---:|"]
        for e in range_events[:TOP_RANGES]:
            memory = getattr(e, "device_memory_usage", 0) if on_cuda else e.cpu_memory_usage
            lines.append(f"| `{e.key}` | {e.count} | {_time(total_us(e))} | {_mib(memory)} |")
    return "\n".join(lines) + "\n"


def profile_block(name: str, *, variant: str = "eager", mode: str = "inference", batch: int = 8,
                  device: str | None = None, out_dir: str | Path = "profiles", bench_shape: bool = True,
                  seed: int = 0) -> ProfileResult:
    """Profile ``WAIT + WARMUP + ACTIVE`` steps of ``name`` under ``variant`` in ``mode`` after one warm-up step.

    Writes ``<out_dir>/<name>-<variant>-<mode>/`` (the trace, and ``top_operators.md`` beside it) and
    returns where. Raises ValueError when the variant cannot run on the device, with the reason.
    """
    from perfkit.env.device import check_batch, resolve_device
    from perfkit.measure.memory import native_stderr_silenced
    from perfkit.registry import get_entry
    from perfkit.variants import MODES, parse_variant

    entry = get_entry(name)
    parsed = parse_variant(variant)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    check_batch(batch)
    device = resolve_device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = entry.create()
    reason = parsed.skip_reason(device, model)
    if reason:
        raise ValueError(f"variant {parsed.name!r} cannot run {name!r} on {device}: {reason}")
    x = entry.example_input(batch, bench=bench_shape, device=device,
                            generator=torch.Generator().manual_seed(seed + 1))
    prepared = parsed.apply(model, x, mode, input_requires_grad=entry.kind == "block", seed=seed)

    # tv:/timm: names carry a colon, which a file name on Windows or a Markdown link cannot hold.
    label = f"{name.replace(':', '_')}-{parsed.name}-{mode}"
    run_dir = Path(out_dir) / label
    run_dir.mkdir(parents=True, exist_ok=True)
    # One trace per run folder: TensorBoard would otherwise show every earlier profile of the cell as
    # another span of the same run.
    for stale in run_dir.glob("*.pt.trace.json*"):
        stale.unlink()
    on_cuda = device.type == "cuda"

    def step() -> None:
        prepared.step()
        if on_cuda:
            torch.cuda.synchronize(device)

    step()  # the first call compiles (compiled variants) and picks algorithms: kept out of the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    ranges = StageRanges(prepared.module, name) if not parsed.compiled else None
    handler = tensorboard_trace_handler(str(run_dir), worker_name=label)
    prof = torch.profiler.profile(
        activities=activities,
        schedule=schedule(wait=WAIT_STEPS, warmup=WARMUP_STEPS, active=ACTIVE_STEPS, repeat=1),
        on_trace_ready=handler, record_shapes=True, profile_memory=True, with_stack=True,
    )
    # kineto prints a "USDT: ... profiler_start/stop" line from C++ at each transition of the schedule.
    with native_stderr_silenced():
        prof.__enter__()
    try:
        if ranges is not None:
            ranges.__enter__()
        try:
            for _ in range(WAIT_STEPS + WARMUP_STEPS + ACTIVE_STEPS):
                step()
                with native_stderr_silenced():
                    prof.step()
        finally:
            if ranges is not None:
                ranges.__exit__(None, None, None)
    finally:
        with native_stderr_silenced():
            prof.__exit__(None, None, None)
    traces = sorted(run_dir.glob("*.pt.trace.json"))
    if len(traces) != 1:
        raise RuntimeError(f"expected one trace in {run_dir}, found {[t.name for t in traces]}")
    range_names = ranges.names if ranges is not None else []
    title = f"{name} · {parsed.name} · {mode} · batch {batch} · {device}"
    table = operator_table(prof, range_names, on_cuda, title, ranges.nested if ranges is not None else set())
    table_path = run_dir / "top_operators.md"
    table_path.write_text(table)
    return ProfileResult(run_dir, traces[0], table_path, table, range_names)
