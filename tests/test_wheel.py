"""``pip install perfkit`` is enough: the wheel, installed into a fresh venv, runs a user's block and variant.

The README's example (section "Your own model") is read from README.md and run from a directory outside
the checkout: ``mynet.py`` registered with ``--perfkit-import``, a second block through the
``perfkit.blocks`` entry-point group of an "installed" package, and a broken entry point that must be
named without stopping the run. docs/variants.md's worked example (``convbn.py``, the ``fold_bn`` variant)
comes in through the ``perfkit.variants`` group and must be a column of the matrix and of the report. The
venv gets torch and the other dependencies from this interpreter's site-packages through a ``.pth`` line
(no network), but its perfkit is the wheel's; it is built once for the module's tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> tuple[str, str]:
    """(mynet.py, the benchmark test) from README.md's "Your own model" section."""
    section = (ROOT / "README.md").read_text().split("## Your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "the README's example is a registering module and a benchmark test"
    return blocks[0], blocks[1]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} -> {result.returncode}\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result


def _docs_file(page: str, name: str) -> str:
    """The ```python block of ``docs/PAGE`` that starts ``# NAME``, as the docs' test writes it."""
    text = (ROOT / "docs" / page).read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if b.startswith(f"# {name}\n")]
    return block


def _dist_info(folder: Path, name: str, entry_points: str) -> None:
    """An "installed" package ``name`` in ``folder`` (on PYTHONPATH), exposing ``entry_points``."""
    dist_info = folder / f"{name}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(entry_points)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the python of a fresh venv with perfkit's wheel installed, the environment to run it in)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the sources, so the build leaves nothing in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("perfkit", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERFKIT_", "PYTHON"))}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(tmp_path / "dist"), str(source)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("perfkit-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path, env).stdout.strip())
    # The dependencies (torch, triton, pytest-benchmark...) from here; .pth files in that folder are not
    # processed, so this checkout's editable perfkit stays out.
    (purelib / "_perfkit_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp_path, env)
    return python, env


@pytest.mark.slow
def test_installed_wheel_runs_a_block_registered_outside_perfkit(installed: tuple[Path, dict[str, str]],
                                                                 tmp_path: Path) -> None:
    python, env = installed
    venv = python.parents[1]
    user = tmp_path / "user"
    (user / "my_benchmarks").mkdir(parents=True)
    mynet, benchmark = _readme_example()
    (user / "mynet.py").write_text(mynet)
    (user / "my_benchmarks" / "test_matrix.py").write_text(benchmark)
    # An "installed" package exposing its blocks through the entry-point group, and a broken one.
    (user / "otherblocks.py").write_text(textwrap.dedent('''
        from torch import nn

        import perfkit


        @perfkit.register("otherconv", kind="block", bench_shape=(8, 16, 16), test_shape=(8, 6, 6))
        def otherconv() -> nn.Module:
            """A block from an installed package's entry point."""
            return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    '''))
    _dist_info(user, "otherblocks",
               "[perfkit.blocks]\notherconv = otherblocks\nbroken = no_such_module_for_perfkit_test\n")

    run_env = {**env, "PYTHONPATH": str(user), "TRITON_INTERPRET": "1"}
    located = _run([str(python), "-c", "import perfkit; print(perfkit.__file__)"], user, run_env).stdout
    assert located.startswith(str(venv)), f"perfkit was imported from {located}, not the installed wheel"

    result = _run([str(python), "-m", "pytest", "my_benchmarks", "-p", "no:cacheprovider", "-rs",
                   "--perfkit-import", "mynet", "--perfkit-blocks=mynet,otherconv",
                   "--perfkit-variants=eager,compile,triton", "--perfkit-modes=inference", "--perfkit-batches=2",
                   "--perfkit-jsonl", "out/results.jsonl", "--benchmark-json", "out/bench.json"], user, run_env)
    assert "entry point broken (no_such_module_for_perfkit_test) failed to load: ModuleNotFoundError" \
        in result.stdout, result.stdout[-2000:]
    records = [json.loads(line) for line in (user / "out" / "results.jsonl").read_text().splitlines()]
    status = {(r["block"], r["variant"]): (r["status"], r["reason"]) for r in records}
    assert status[("mynet", "eager")][0] == "ok"
    assert status[("otherconv", "eager")][0] == "ok"
    # mynet's relu(bn(y) + x) is fused by pattern, and its correctness checked in the interpreter.
    assert status[("mynet", "triton")][0] == "skipped" and status[("mynet", "triton")][1].startswith(
        "correctness checked"), status[("mynet", "triton")]
    assert status[("mynet", "compile")][0] in ("ok", "skipped"), status[("mynet", "compile")]

    perfkit_cli = venv / "bin" / "perfkit"
    listing = _run([str(perfkit_cli), "--import", "mynet", "list", "*"], user, run_env).stdout
    assert "mynet" in listing and "otherconv" in listing and "basic" in listing
    _run([str(perfkit_cli), "report", "out/bench.json", "-o", "reports"], user, run_env)
    report = "\n".join(p.read_text() for p in (user / "reports").rglob("README.md"))
    assert "mynet" in report and "otherconv" in report


@pytest.mark.slow
def test_installed_wheel_runs_a_variant_from_an_entry_point(installed: tuple[Path, dict[str, str]],
                                                            tmp_path: Path) -> None:
    # docs/variants.md's worked example, as an installed package exposing it through perfkit.variants.
    python, env = installed
    user = tmp_path / "user"
    (user / "my_benchmarks").mkdir(parents=True)
    (user / "convbn.py").write_text(_docs_file("variants.md", "convbn.py"))
    _, benchmark = _readme_example()
    (user / "my_benchmarks" / "test_matrix.py").write_text(benchmark)
    _dist_info(user, "convbn", "[perfkit.variants]\nconvbn = convbn\nbroken = no_such_module_for_perfkit_test\n")
    run_env = {**env, "PYTHONPATH": str(user)}

    perfkit_cli = python.parent / "perfkit"
    listing = _run([str(perfkit_cli), "list", "--variants"], user, run_env)
    assert "fold_bn" in listing.stdout and "each BatchNorm folded into the convolution" in listing.stdout
    assert "entry point broken (no_such_module_for_perfkit_test) failed to load" in listing.stderr

    _run([str(python), "-m", "pytest", "my_benchmarks", "-p", "no:cacheprovider", "--perfkit-blocks=basic,resnet18",
          "--perfkit-variants=eager,fold_bn,channels_last+fold_bn", "--perfkit-modes=inference,training",
          "--perfkit-batches=2", "--perfkit-jsonl", "out/results.jsonl", "--benchmark-json", "out/bench.json"],
         user, run_env)
    records = [json.loads(line) for line in (user / "out" / "results.jsonl").read_text().splitlines()]
    status = {(r["block"], r["variant"], r["mode"]): (r["status"], r["reason"]) for r in records}
    for block in ("basic", "resnet18"):
        for variant in ("fold_bn", "channels_last+fold_bn"):
            assert status[(block, variant, "inference")] == ("ok", None), status
            # Folding replaces the Parameters a training cell trains: skipped, as registered.
            assert status[(block, variant, "training")][0] == "skipped", status
    folded = [r for r in records if r["variant"] == "fold_bn" and r["status"] == "ok"]
    assert all(r["rel_error"] <= r["tolerance"] and r["speedup_vs_eager"] > 0 for r in folded)

    _run([str(perfkit_cli), "report", "out/bench.json", "-o", "reports", "--no-compare"], user, run_env)
    report = "\n".join(p.read_text() for p in (user / "reports").rglob("README.md"))
    assert "channels_last+fold_bn" in report and "fold_bn" in report.replace("channels_last+fold_bn", "")
