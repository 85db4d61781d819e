"""The matrix's profiles (``quick``, ``full``, ``gpu-smoke``) and kernel cells, as plain data.

No pytest here: ``perfkit baseline`` reads the quick profile from a plain CLI process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from perfkit.measure import QUICK_POLICY, TimingPolicy
from perfkit.variants import MODES


@dataclass(frozen=True)
class Profile:
    """A default matrix: which entries, variants, modes and batches, at which shapes."""

    blocks: tuple[str, ...]
    """Names or globs; those not registered (yet) are left out."""
    variants: tuple[str, ...]
    modes: tuple[str, ...]
    block_batches: tuple[int, ...]
    network_batches: tuple[int, ...]
    bench_shape: bool
    policy: TimingPolicy
    extra_cells: tuple[tuple[str, str], ...] = field(default=())
    """(entry, variant) pairs added on top: a variant too slow to run on every entry (a first compile)."""
    kernel_variants: tuple[str, ...] = ("eager", "compile", "triton")
    kernel_dtypes: tuple[str, ...] = ("float32",)
    kernel_layouts: tuple[str, ...] = ("nchw",)
    inference_only: tuple[tuple[str, str], ...] = field(default=())
    """(entry, variant) pairs left out of training: a network's first training compile costs a minute or more."""
    ceilings: bool = False
    """Measure the device's copy bandwidth and bf16 matmul in the run (benchmarks/test_ceilings.py)."""
    time_limit_s: float | None = None
    """The wall time the profile is sized for: its plan is printed and checked against it."""


PROFILES = {
    # About a minute on 2 CPU cores: small shapes, a few entries, the variants a CPU runs; one first
    # compile (~25 s each mode) on the smallest block only.
    "quick": Profile(
        blocks=("basic", "bottleneck", "wrc", "dense_plain", "inception", "d2l_resnet18"),
        variants=("eager", "channels_last", "bf16"),
        modes=MODES,
        block_batches=(8,),
        network_batches=(8,),
        bench_shape=False,
        policy=QUICK_POLICY,
        # The fused kernel inside a block: on the CPU only gate-checked, under TRITON_INTERPRET=1 (make bench
        # sets it where there is no GPU). Not dense_plain's (the interpreter takes 87 s over its two modes),
        # nor the compiled compositions (0.2-0.7 s of compile each): tests/test_fused_ops.py gates those,
        # the GPU profiles time them.
        extra_cells=(("basic", "compile"), ("wrc", "triton")),
        # A first compile of each kernel expression would cost ~25 s apiece here; the GPU profile has them.
        kernel_variants=("eager", "triton"),
    ),
    # For a GPU: benchmark shapes, every entry, every variant alone and the combinations that matter.
    "full": Profile(
        blocks=("*",),
        variants=("eager", "channels_last", "bf16", "fp16", "channels_last+bf16", "channels_last+fp16", "compile",
                  "channels_last+bf16+compile", "max-autotune", "cudagraphs", "channels_last+bf16+cudagraphs",
                  "triton", "channels_last+bf16+triton"),
        modes=MODES,
        block_batches=(32, 128, 256),
        network_batches=(32, 128),
        bench_shape=True,
        policy=TimingPolicy(),
        kernel_dtypes=("float32", "bfloat16"),
        kernel_layouts=("nchw", "channels_last"),
        ceilings=True,
    ),
    # One call on one H100/H200 (`make bench-gpu`), sized by perfkit/matrix/plan.py's cost model to stay under
    # 7 minutes with its first compiles: eager, channels_last, channels_last+bf16 and triton on the blocks and
    # networks with fused kernels at batch 64; compile on each, in training too for the blocks only (a
    # network's training compile is a minute or more); triton+compile on the two blocks whose kernels are
    # the point (wrc, dense); the kernel cells in float32; the ceilings. Compiling every one of these entries
    # in both modes would estimate at 13.5 minutes.
    "gpu-smoke": Profile(
        blocks=("basic", "bottleneck", "wrc", "dense", "resnet50", "densenet121"),
        variants=("eager", "channels_last", "channels_last+bf16", "triton"),
        modes=MODES,
        block_batches=(64,),
        network_batches=(64,),
        bench_shape=True,
        policy=TimingPolicy(min_rounds=10, max_rounds=300, max_time_s=1.0, warmup_max_s=2.0),
        extra_cells=(("basic", "compile"), ("bottleneck", "compile"), ("wrc", "compile"), ("dense", "compile"),
                     ("resnet50", "compile"), ("densenet121", "compile"), ("wrc", "triton+compile"),
                     ("dense", "triton+compile")),
        inference_only=(("resnet50", "compile"), ("densenet121", "compile")),
        kernel_variants=("eager", "triton"),
        ceilings=True,
        time_limit_s=7 * 60,
    ),
}
"""The profiles by name; ``--perfkit-profile`` picks one (default: ``full`` with a GPU, ``quick`` without)."""

KERNELS = ("wrc_epilogue", "dense_bn_relu")
"""Kernel-level cells (benchmarks/test_kernels.py): each fused kernel alone against the same expression in
eager PyTorch and under torch.compile."""
KERNEL_VARIANTS = ("eager", "compile", "triton")
"""The variants a kernel cell has; a ``--perfkit-variants`` selection keeps only these for the kernel cells."""
