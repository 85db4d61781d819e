"""Blocks from outside perfkit: ``--import``/``--perfkit-import`` modules and ``perfkit.blocks`` entry points.

Each case runs in a subprocess: registering is global to a process, and the suite's own registry must not
grow. (tests/test_wheel.py runs the same from an installed wheel, outside the checkout.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

USER_MODULE = textwrap.dedent('''
    from torch import nn

    import perfkit


    @perfkit.register("userconv", kind="block", bench_shape=(4, 8, 8), test_shape=(4, 6, 6))
    def userconv() -> nn.Module:
        """A user's block."""
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
''')


def _run(args: list[str], path: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERFKIT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_import_adds_the_modules_blocks(tmp_path: Path) -> None:
    (tmp_path / "userblocks.py").write_text(USER_MODULE)
    result = _run(["-m", "perfkit", "--import", "userblocks", "list", "user*"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "userconv" in result.stdout and "A user's block." in result.stdout


def test_a_module_that_does_not_import_is_named_and_exits_2(tmp_path: Path) -> None:
    result = _run(["-m", "perfkit", "--import", "no_such_user_module", "list"], tmp_path)
    assert result.returncode == 2
    assert "cannot import 'no_such_user_module'" in result.stderr and "ModuleNotFoundError" in result.stderr


def test_pytest_perfkit_import_of_a_missing_module_is_a_usage_error(tmp_path: Path) -> None:
    result = _run(["-m", "pytest", "benchmarks/", "-p", "no:cacheprovider", "--collect-only", "-q",
                   "--perfkit-import", "no_such_user_module"], tmp_path)
    assert result.returncode == 4, result.stdout[-2000:]
    assert "--perfkit-import: cannot import 'no_such_user_module'" in result.stderr


def test_entry_points_load_and_a_broken_one_is_named_while_the_rest_loads(tmp_path: Path) -> None:
    (tmp_path / "userblocks.py").write_text(USER_MODULE)
    dist_info = tmp_path / "userblocks-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: userblocks\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[perfkit.blocks]\nuserblocks = userblocks\nbroken = no_such_user_module\n")
    code = ("import perfkit.registry as r; print(r.list_blocks('user*')); print(r.plugin_errors()); "
            "print('basic' in r.list_blocks())")
    result = _run(["-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    names, errors, builtin = result.stdout.strip().splitlines()
    assert names == "['userconv']" and builtin == "True"
    assert "broken (no_such_user_module)" in errors and "ModuleNotFoundError" in errors
    assert "entry point 'broken' (no_such_user_module) failed to load" in result.stderr
