"""User variants: ``perfkit.register_variant``, the ``perfkit.variants`` entry points, ``+`` with the built-ins,
``perfkit list --variants``, and a user atom measured through the same gate and timing as a built-in.

Registering is global to a process: each test here files its atoms in a registry of its own (the
``user_atoms`` fixture), and the entry-point cases run in a subprocess. tests/test_wheel.py runs the
worked example of docs/variants.md from an installed wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import perfkit
import perfkit.user_variants as user_variants
from perfkit import registry
from perfkit.cli import main
from perfkit.measure import TimingPolicy, measure_cell
from perfkit.variants import VARIANTS, list_variants, parse_variant

ROOT = Path(__file__).resolve().parents[1]
FAST = TimingPolicy(min_rounds=6, max_rounds=30, max_time_s=0.3, warmup_batch_s=0.005, warmup_max_s=0.1)
SHAPE = (4, 6, 6)


@pytest.fixture
def user_atoms(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry of user atoms for one test, the process's own restored after it."""
    user_variants.load_user_variants()
    monkeypatch.setattr(user_variants, "_USER_VARIANTS", {})


def same(model: nn.Module, *, mode: str, device: torch.device) -> nn.Module:
    """The model unchanged."""
    return model


def scaled(model: nn.Module, *, mode: str, device: torch.device) -> nn.Module:
    """A planted wrong variant: the output 1% too large."""
    return nn.Sequential(model, _Scale(1.01))


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class TinyConv(nn.Module):
    """A 3x3 convolution and BatchNorm: a block in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> str:
    """TinyConv registered under a throwaway name for one test."""
    registry._load()
    monkeypatch.setitem(registry._REGISTRY, "test_tinyconv", registry.Entry("test_tinyconv", "block", TinyConv,
                                                                             SHAPE, SHAPE))
    return "test_tinyconv"


def test_a_registered_atom_parses_composes_and_is_listed(user_atoms) -> None:
    perfkit.register_variant("mine", same, description="my transform")
    assert parse_variant("mine").user == ("mine",)
    # Built-ins keep their places; user atoms sit between triton and the compile mode, as they apply.
    assert parse_variant("compile+mine+bf16+channels_last").name == "channels_last+bf16+mine+compile"
    assert parse_variant("triton+mine").name == "triton+mine"
    assert parse_variant("channels_last").name == "channels_last"
    assert list_variants() == [*VARIANTS, "mine"] and list_variants("m*") == ["max-autotune", "mine"]


def test_user_atoms_keep_the_order_written(user_atoms) -> None:
    perfkit.register_variant("first", same)
    perfkit.register_variant("second", same)
    assert parse_variant("second+first").name == "second+first"
    assert parse_variant("first+second") != parse_variant("second+first")


@pytest.mark.parametrize("name, message", [
    ("eager", "is a built-in atom"),
    ("My+Variant", "use lowercase letters, digits"),
    ("int8,x", "use lowercase letters, digits"),
    ("", "use lowercase letters, digits"),
])
def test_a_bad_name_says_what_a_name_may_be(user_atoms, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        perfkit.register_variant(name, same)


def test_registering_twice_raises_naming_the_first(user_atoms) -> None:
    perfkit.register_variant("mine", same)
    with pytest.raises(ValueError, match=r"'mine' is already registered \(by [\w.]*test_user_variants\.same\)"):
        perfkit.register_variant("mine", scaled)


def test_bad_metadata_is_refused_with_the_valid_choices(user_atoms) -> None:
    with pytest.raises(ValueError, match="dtype 'int8' is not one of float32, bfloat16, float16"):
        perfkit.register_variant("q", same, dtype="int8")
    with pytest.raises(ValueError, match="must be a non-empty tuple of inference, training"):
        perfkit.register_variant("q", same, modes=("eval",))
    with pytest.raises(ValueError, match="must be a non-empty tuple"):
        perfkit.register_variant("q", same, modes="inference")
    with pytest.raises(TypeError, match=r"must accept \(model, \*, mode, device\)"):
        perfkit.register_variant("q", lambda model: model)
    assert "q" not in list_variants()


def test_an_unknown_atom_lists_the_user_atoms_too(user_atoms) -> None:
    perfkit.register_variant("mine", same)
    with pytest.raises(ValueError, match="unknown variant atom.*valid atoms: eager, .*, triton, mine"):
        parse_variant("channels_last+mien")


@pytest.mark.parametrize("name, message", [
    ("jit+compile", "jit and compile each compile the model"),
    ("jit+jit2", "jit and jit2 each compile"),
    ("half+bf16", "half computes in float16 itself; bf16 autocast would be a second dtype"),
    ("half+brain", r"half \(float16\) and brain \(bfloat16\) compute in different dtypes"),
    ("eager+jit", "'eager' is the untransformed reference"),
])
def test_combinations_that_cannot_be_one_cell_are_refused(user_atoms, name: str, message: str) -> None:
    perfkit.register_variant("jit", same, compiles=True)
    perfkit.register_variant("jit2", same, compiles=True)
    perfkit.register_variant("half", same, dtype="float16")
    perfkit.register_variant("brain", same, dtype="bfloat16")
    with pytest.raises(ValueError, match=message):
        parse_variant(name)


def test_dtype_and_compile_come_from_the_registration(user_atoms) -> None:
    perfkit.register_variant("brain", same, dtype="bfloat16")
    perfkit.register_variant("jit", same, compiles=True)
    assert parse_variant("brain+channels_last").compute_dtype == "bfloat16"
    assert parse_variant("jit").compiled and not parse_variant("brain").compiled
    assert parse_variant("jit").compute_dtype == "float32"


def test_the_transform_runs_after_triton_and_before_channels_last(user_atoms) -> None:
    seen = {}

    def rebuild(model: nn.Module, *, mode: str, device: torch.device) -> nn.Module:
        """Builds a fresh convolution (in training mode, contiguous)."""
        seen.update(mode=mode, device=device, training=model.training)
        return nn.Sequential(model, nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    perfkit.register_variant("rebuild", rebuild)
    prepared = parse_variant("channels_last+rebuild").apply(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), "inference")
    assert seen == {"mode": "inference", "device": torch.device("cpu"), "training": False}
    # The modules it built are converted by channels_last and put in the mode's state.
    assert prepared.module[1].weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(m.training for m in prepared.module.modules())


def test_a_training_transform_that_drops_the_parameters_is_an_error(user_atoms) -> None:
    perfkit.register_variant("copy", lambda model, *, mode, device: nn.Conv2d(3, 3, 1))
    parse_variant("copy").apply(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 2, 2), "inference")
    with pytest.raises(ValueError, match="replaced 2 of the model's 2 Parameters.*modes=\\('inference',\\)"):
        parse_variant("copy").apply(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 2, 2), "training")
    perfkit.register_variant("notmodule", lambda model, *, mode, device: model.forward)
    with pytest.raises(TypeError, match="returned method, not an nn.Module"):
        parse_variant("notmodule").apply(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 2, 2), "inference")


def test_skip_reasons_by_mode_and_device(user_atoms) -> None:
    perfkit.register_variant("infer", same, modes=("inference",))
    perfkit.register_variant("gpuonly", same, skip_reason=lambda d: None if d.type == "cuda" else "needs CUDA")
    assert parse_variant("infer").skip_reason("cpu", mode="inference") is None
    assert parse_variant("infer").skip_reason("cpu", mode="training") == \
        "infer runs only in inference (registered with modes=('inference',))"
    assert parse_variant("gpuonly+bf16").skip_reason("cpu") == "gpuonly: needs CUDA"


def test_a_user_atom_is_gated_and_timed_like_a_built_in(user_atoms, tiny: str) -> None:
    perfkit.register_variant("same", same)
    record = measure_cell(tiny, "channels_last+same", "training", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "ok", record.reason
    assert record.variant == "channels_last+same" and record.dtype == "float32"
    assert record.rel_error <= record.tolerance and record.grad_rel_error <= record.grad_tolerance
    assert record.rounds >= FAST.min_rounds and record.speedup_vs_eager is not None


def test_a_wrong_user_atom_fails_its_gate_and_is_not_timed(user_atoms, tiny: str) -> None:
    perfkit.register_variant("scaled", scaled)
    record = measure_cell(tiny, "scaled", "inference", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "failed" and "against the float64 reference" in record.reason
    assert record.rel_error == pytest.approx(0.01, rel=1e-3) and record.step_time_median_s is None


def test_a_skipped_mode_is_a_skipped_cell(user_atoms, tiny: str) -> None:
    perfkit.register_variant("infer", same, modes=("inference",))
    record = measure_cell(tiny, "infer", "training", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "skipped" and record.reason.startswith("infer runs only in inference")


def test_a_compiling_atom_records_its_compile_time(user_atoms, tiny: str) -> None:
    def trace(model: nn.Module, *, mode: str, device: torch.device) -> nn.Module:
        """dynamo's trace without inductor: a compile that costs a second, not half a minute."""
        return torch.compile(model, backend="eager")

    perfkit.register_variant("trace", trace, compiles=True)
    record = measure_cell(tiny, "trace", "inference", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "ok", record.reason
    assert record.compile_time_s > 0 and "compile" in record.wall_split_s


def test_list_variants_shows_built_ins_and_user_atoms(user_atoms, capsys: pytest.CaptureFixture[str]) -> None:
    perfkit.register_variant("brain", same, dtype="bfloat16", modes=("inference",))
    assert main(["list", "--variants"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert list(rows) == list_variants()
    assert "built-in" in rows["triton"] and "fused Triton kernels" in rows["triton"]
    assert rows["brain"].split()[1].endswith("test_user_variants.same")
    assert rows["brain"].split()[2:4] == ["bfloat16", "inference"]
    assert rows["brain"].endswith("The model unchanged.")
    assert main(["list", "--variants", "nosuch*"]) == 2
    assert "no variant matches 'nosuch*'" in capsys.readouterr().err


def _run(args: list[str], path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERFKIT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_entry_points_add_atoms_and_a_broken_one_is_named(tmp_path: Path) -> None:
    (tmp_path / "uservariants.py").write_text(textwrap.dedent('''
        import perfkit


        def unchanged(model, *, mode, device):
            """A user's variant from an installed package."""
            return model


        perfkit.register_variant("unchanged", unchanged)
    '''))
    dist_info = tmp_path / "uservariants-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: uservariants\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[perfkit.variants]\nunchanged = uservariants\nbroken = no_such_variant_module\n")
    listing = _run(["-m", "perfkit", "list", "--variants"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "unchanged" in listing.stdout and "A user's variant from an installed package." in listing.stdout
    assert "entry point broken (no_such_variant_module) failed to load: ModuleNotFoundError" in listing.stderr
    # pytest takes the atom in --perfkit-variants, composed with a built-in, as a column of the matrix.
    collected = _run(["-m", "pytest", "benchmarks/test_matrix.py", "-p", "no:cacheprovider", "--collect-only", "-q",
                      "--perfkit-blocks=basic", "--perfkit-modes=inference", "--perfkit-batches=2",
                      "--perfkit-variants=eager,unchanged+channels_last"], tmp_path)
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    assert "basic-channels_last+unchanged-inference-b2" in collected.stdout
    refused = _run(["-m", "pytest", "benchmarks/test_matrix.py", "-p", "no:cacheprovider", "--collect-only", "-q",
                    "--perfkit-variants=broken"], tmp_path)
    assert refused.returncode == 4
    assert "valid atoms: eager" in refused.stderr and ", unchanged (combine" in refused.stderr
    assert "broken (no_such_variant_module) failed to load" in refused.stderr
