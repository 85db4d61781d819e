"""What ``perfkit ab`` itself costs: wall per cell, the share of it in timed rounds, the workers' start.

This checkout against itself (two folder sides, no git needed) over the matrix's first block in each of its
modes, eager, its first batch. It records and never asserts: the figures go to ``extra_info``. It takes
about half a minute, so the file's name keeps it out of ``pytest benchmarks/`` (pytest collects ``test_*.py``):
it runs when named, ``pytest benchmarks/ab_cost.py``.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 3.0
"""Timed rounds per cell, both sides: what a quick A/B of one cell spends."""


def test_ab_cost(perfkit_matrix, benchmark, tmp_path: Path) -> None:
    """``perfkit ab ROOT ROOT`` over one block's cells; its wall, per cell and in timed rounds."""
    out = tmp_path / "ab.json"
    command = [sys.executable, "-m", "perfkit", "ab", str(ROOT), str(ROOT), "--blocks", perfkit_matrix.blocks[0],
               "--modes", ",".join(perfkit_matrix.modes), "--variants", "eager",
               "--batches", str((perfkit_matrix.batches or [8])[0]), "--device", perfkit_matrix.device.type,
               "--budget-s", str(BUDGET_S), "--json", str(out)]
    walls: list[float] = []

    def run() -> None:
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=False, capture_output=True, timeout=600)
        walls.append(time.perf_counter() - start)

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    cells = json.loads(out.read_text())["cells"]
    timed = [c for c in cells if c["verdict"]]
    cell_wall = sum(c["wall_s"] for c in cells)
    benchmark.extra_info.update(
        ab_wall_s=walls[0], cells=len(cells), wall_per_cell_s=cell_wall / len(cells),
        timed_share=sum(c["timed_s"] for c in timed) / cell_wall if cell_wall else None,
        start_and_close_s=walls[0] - cell_wall, budget_s=BUDGET_S,
        per_cell={c["cell"]: {"wall_s": c["wall_s"], "timed_s": c["timed_s"], "pairs": c["pairs"],
                              "verdict": c["verdict"] or c["status"]} for c in cells})
    print(json.dumps(benchmark.extra_info, indent=1))
