"""Compile every perfkit Triton kernel for a CUDA GPU, without one, and print what each compiled variant uses.

    python benchmarks/compile_check.py [--arch 90] [--batch 32]

The launch wrappers run at the benchmark shapes (``wrc_epilogue`` at ResNet stages 1 and 4, ``bn_relu`` at
the last prefix of DenseNet-121's third block, and that whole block), NCHW and channels_last, float32 and
bfloat16, training (forward and backward) and inference, on ``meta`` or CPU tensors whose data is never
computed: every kernel launch is intercepted instead of run. Each distinct specialization is then compiled
for ``cuda:sm_<arch>`` the way ``JITFunction.run`` would compile it on that GPU (same binder: integer
arguments equal to 1 become constants, pointers and integers divisible by 16 are marked so), and its cubin's
resource usage is read back with the cuobjdump Triton ships.

Per variant: registers per thread, local memory per thread (where ptxas spills: these kernels hold no local
arrays, so nonzero means spills) and the spill instructions in the SASS, shared memory, warps, and the
largest grid it was launched with. A grid beyond CUDA's limits (x < 2**31, y and z ≤ 65535) is flagged.

Needs only triton (any 3.x whose ``JITFunction`` has ``_pack_args``; checked with 3.6 and 3.9) and its
bundled ptxas: no GPU, no CUDA driver. It uses Triton's private launch internals, so a future Triton may
need this script updated; a kernel that fails to compile is reported with its error, not skipped.
"""

from __future__ import annotations

import os

# The kernels must be decorated as compilable JIT functions, not interpreted ones: set before importing them.
os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from perfkit.kernels import bn_relu, bn_stats, dense, wrc  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from perfkit.blocks.densenet import DenseBlock  # noqa: E402
from perfkit.fused.dense import FusedDenseBlock  # noqa: E402

MOMENTUM, EPS = 0.1, 1e-5
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)
"""Largest grid dimension CUDA launches along x, y and z."""


@dataclass
class Variant:
    """One compiled specialization of a kernel and the cases and grids that launch it."""

    kernel: str
    pointer_dtypes: str
    """Element types of the pointer arguments, deduplicated in order (e.g. ``bf16,fp32``)."""
    constexprs: dict[str, object]
    cases: list[str] = field(default_factory=list)
    grids: list[tuple[int, ...]] = field(default_factory=list)
    registers: int | None = None
    local_bytes: int | None = None
    spill_instructions: int | None = None
    shared_bytes: int | None = None
    num_warps: int | None = None
    error: str | None = None


class Compiler:
    """Compiles intercepted launches for one CUDA target, one compile per distinct specialization."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.variants: dict[tuple, Variant] = {}
        self._binders: dict[str, Callable] = {}
        self._cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")

    def launch(self, kernel: JITFunction, case: str, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        """What ``kernel[grid](*args, **kwargs)`` would compile on the target: compile it once, note the grid."""
        # Qualified by module: kernel names are unique per module, not across perfkit.kernels.
        name = f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.__name__}"
        if name not in self._binders:
            self._binders[name] = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        kwargs = {**kwargs, "debug": False}
        bound_args, specialization, options = self._binders[name](*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(self.backend, kwargs, bound_args, specialization,
                                                                  options)
        key = (name, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())))
        variant = self.variants.get(key)
        if variant is None:
            names = [param.name for param in kernel.params]
            pointers = dict.fromkeys(kind[1:] for kind in signature.values() if kind.startswith("*"))
            constants = {names[path[0]]: value for path, value in sorted(constexprs.items())}
            variant = Variant(name, ",".join(pointers), constants)
            self.variants[key] = variant
            self._compile(variant, ASTSource(kernel, signature, constexprs, attrs), options)
        if case not in variant.cases:
            variant.cases.append(case)
        variant.grids.append(tuple(grid) + (1,) * (3 - len(grid)))

    def _compile(self, variant: Variant, source: ASTSource, options) -> None:
        try:
            compiled = triton.compile(source, target=self.target, options=options.__dict__)
        except Exception as error:  # noqa: BLE001 - a compile failure is the result to report
            variant.error = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            return
        variant.shared_bytes = compiled.metadata.shared
        variant.num_warps = compiled.metadata.num_warps
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([self._cuobjdump, "--dump-resource-usage", str(cubin)], check=True,
                                   capture_output=True, text=True).stdout
            sass = subprocess.run([self._cuobjdump, "--dump-sass", str(cubin)], check=True,
                                  capture_output=True, text=True).stdout
        variant.registers = int(re.search(r"REG:(\d+)", usage).group(1))
        variant.local_bytes = int(re.search(r"LOCAL:(\d+)", usage).group(1))
        variant.spill_instructions = len(re.findall(r"\b(?:STL|LDL)\b", sass))


@contextmanager
def intercepted(compiler: Compiler, case: str) -> Iterator[None]:
    """Within the block, every kernel launch in perfkit.kernels goes to ``compiler`` instead of a GPU."""
    kernels = [value for module in (bn_stats, bn_relu, wrc, dense) for value in vars(module).values()
               if isinstance(value, JITFunction)]

    def interceptor(kernel: JITFunction) -> Callable:
        def run(*args, grid, warmup, **kwargs):
            compiler.launch(kernel, case, grid, args, kwargs)

        return run

    for kernel in kernels:
        kernel.run = interceptor(kernel)
    try:
        yield
    finally:
        for kernel in kernels:
            del kernel.run


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def _channel_vectors(channels: int, dtype: torch.dtype, device: str = "cpu") -> list[torch.Tensor]:
    return [torch.ones(channels, dtype=dtype, device=device) for _ in range(4)]


def run_wrc(shape: tuple[int, ...], layout: str, dtype: torch.dtype, training: bool) -> None:
    """The wrc ops (statistics, epilogue, backward in training) at ``shape``; parameters in float32 as under AMP.

    The ops are called directly on CPU tensors (the launches are intercepted, nothing is computed): the public
    wrapper refuses CPU tensors outside the interpreter, and on meta tensors the ops run their fake versions.
    """
    y = _layout(torch.empty(shape, dtype=dtype), layout)
    s = _layout(torch.empty(shape, dtype=dtype), layout)
    weight, bias, running_mean, running_var = _channel_vectors(shape[1], torch.float32)
    alpha, beta = torch.ones(()), torch.ones(())
    if training:
        mean, var = torch.ops.perfkit.bn_stats(y, running_mean, running_var, None, MOMENTUM)
    else:
        mean, var = running_mean, running_var
    out = torch.ops.perfkit.wrc_epilogue(y, s, mean, var, weight, bias, alpha, beta, training, EPS)
    if training:
        torch.ops.perfkit.wrc_backward(torch.empty_like(out), y, s, weight, bias, alpha, beta, mean, var, training,
                                       EPS, [True] * 6)


def run_bn_relu(shape: tuple[int, ...], layout: str, dtype: torch.dtype, training: bool) -> None:
    """bn_relu forward (and backward in training) on a channel prefix of a dense block's buffer (CPU tensors:
    the kernels are intercepted, only torch's own small ops run)."""
    n, c, h, w = shape
    buffer = _layout(torch.empty((n, c + 32, h, w), dtype=dtype), layout)
    x = buffer[:, :c].requires_grad_(training)
    weight, bias, running_mean, running_var = _channel_vectors(c, torch.float32)
    weight.requires_grad_(training)
    bias.requires_grad_(training)
    y = bn_relu.bn_relu(x, weight, bias, running_mean, running_var, training=training, momentum=MOMENTUM, eps=EPS)
    if training:
        y.backward(torch.empty_like(y))


def run_dense_block(shape: tuple[int, ...], layout: str, dtype: torch.dtype, training: bool) -> None:
    """DenseNet-121's third block (256 channels in, 24 BC layers, k = 32) through FusedDenseBlock.

    On CPU tensors (autocast queries reject ``meta``): the convolutions run for real on uninitialized data.
    """
    n, c, h, w = shape
    block = DenseBlock(c, 24, 32, bottleneck=True).to(dtype).train(training)
    x = _layout(torch.empty(shape, dtype=dtype), layout).requires_grad_(training)
    out = FusedDenseBlock.from_reference(block)(x)
    if training:
        out.backward(torch.empty_like(out))


def cases(batch: int) -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, thunk) for every benchmark configuration whose launches are compiled."""
    runs = {
        "wrc": (run_wrc, [(batch, 256, 56, 56), (batch, 2048, 7, 7)]),
        "bn_relu": (run_bn_relu, [(batch, 992, 14, 14)]),
        "dense_block3": (run_dense_block, [(batch, 256, 14, 14)]),
    }
    for name, (run, shapes) in runs.items():
        for shape in shapes:
            for layout in ("nchw", "channels_last"):
                for dtype in (torch.float32, torch.bfloat16):
                    for training in (True, False):
                        label = (f"{name} {'x'.join(map(str, shape))} {layout} {str(dtype).removeprefix('torch.')} "
                                 f"{'train' if training else 'eval'}")
                        yield label, lambda run=run, shape=shape, layout=layout, dtype=dtype, training=training: \
                            run(shape, layout, dtype, training)


def _format_constexprs(constexprs: dict[str, object]) -> str:
    return " ".join(f"{name}={value}" for name, value in constexprs.items())


def report(compiler: Compiler) -> int:
    """Print one table per kernel; return the number of variants that failed or exceed a grid limit."""
    problems = 0
    by_kernel: dict[str, list[Variant]] = {}
    for variant in compiler.variants.values():
        by_kernel.setdefault(variant.kernel, []).append(variant)
    for kernel, variants in sorted(by_kernel.items()):
        print(f"\n{kernel}  ({len(variants)} variants)")
        print(f"  {'regs':>4} {'local B':>7} {'spill ins':>9} {'smem B':>7} {'warps':>5} {'largest grid':>20}  "
              f"{'pointers':<10} constexprs  [first case +other cases]")
        for variant in variants:
            largest = tuple(max(grid[axis] for grid in variant.grids) for axis in range(3))
            over = [axis for axis in range(3) if largest[axis] > CUDA_GRID_LIMITS[axis]]
            constexprs = _format_constexprs(variant.constexprs)
            if variant.error is not None:
                problems += 1
                print(f"  COMPILE FAILED: {variant.error}  {variant.pointer_dtypes} {constexprs}  [{variant.cases[0]}]")
                continue
            flag = f"  GRID OVER CUDA LIMIT on axis {over}" if over else ""
            problems += bool(over)
            print(f"  {variant.registers:>4} {variant.local_bytes:>7} {variant.spill_instructions:>9} "
                  f"{variant.shared_bytes:>7} {variant.num_warps:>5} {str(largest):>20}  "
                  f"{variant.pointer_dtypes:<10} {constexprs}  "
                  f"[{variant.cases[0]}{f' +{len(variant.cases) - 1}' if len(variant.cases) > 1 else ''}]{flag}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (90: H100)")
    parser.add_argument("--batch", type=int, default=32, help="batch of every benchmark shape")
    args = parser.parse_args()
    compiler = Compiler(args.arch)
    print(f"triton {triton.__version__}, target cuda sm_{args.arch}")
    for label, thunk in cases(args.batch):
        with intercepted(compiler, label):
            thunk()
    problems = report(compiler)
    print(f"\n{len(compiler.variants)} variants, {problems} with a compile failure or grid over a CUDA limit")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
