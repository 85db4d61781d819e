"""The lines that end a matrix run: contended cells, the largest speedups, where the wall time went."""

from __future__ import annotations

from perfkit.record import Record


def run_summary(records: list[Record]) -> list[str]:
    """Lines for the end of a run: contended cells, the largest ranked speedup, where the wall time went."""
    timed = [r for r in records if r.status == "ok"]
    if not timed:
        return []
    contended = [r for r in timed if r.contended]
    lines = [f"perfkit: {len(timed)} cells timed, {len(contended)} contended (other processes took the cores "
             "they ran on: kept, never ranked)"]
    for r in contended:
        load = r.machine_load or {}
        lines.append(f"  contended: {r.block}-{r.variant}-{r.mode}-b{r.batch}: {load.get('contended_reason')}")
    every = [r for r in timed if r.speedup_vs_eager is not None]
    if every:
        top = max(every, key=lambda r: r.speedup_vs_eager)
        lines.append(f"perfkit: largest speedup of any cell, contended or not: {top.speedup_vs_eager:.2f}x "
                     f"[{top.speedup_ci_low:.2f}, {top.speedup_ci_high:.2f}] ({top.block} {top.variant} {top.mode} "
                     f"b{top.batch})")
    paired = [r for r in every if not r.contended]
    if paired:
        best = max(paired, key=lambda r: r.speedup_vs_eager)
        lines.append(f"perfkit: largest ranked speedup {best.speedup_vs_eager:.2f}x "
                     f"[{best.speedup_ci_low:.2f}, {best.speedup_ci_high:.2f}] ({best.block} {best.variant} "
                     f"{best.mode} b{best.batch}, interleaved with eager)")
    split: dict[str, float] = {}
    for r in records:
        for stage, seconds in (r.wall_split_s or {}).items():
            split[stage] = split.get(stage, 0.0) + seconds
    total = sum(split.values())
    if total > 0:
        parts = ", ".join(f"{stage} {seconds / total:.0%}" for stage, seconds in
                          sorted(split.items(), key=lambda item: -item[1]))
        timed_share = split.get("timed rounds", 0.0) / total
        lines.append(f"perfkit: wall time of the cells {total:.1f} s, {timed_share:.0%} of it timed rounds: {parts}")
    return lines
