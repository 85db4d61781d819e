"""The report's plots: a speedup heatmap and memory bars per mode, and the roofline; each a PNG with a fixed
name in the device folder, drawn from the summary frame (``perfkit.results.frame``)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd

from perfkit.results.frame import (
    REFERENCE_VARIANT,
    block_rows,
    flags,
    has_value,
    ordered_variants,
    peak_tflops,
    within_noise,
)


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (files, no display).

    Imported on the first plot, not with this module: loading results, comparing and the index need no
    matplotlib, and choosing a backend at import would override the one of a notebook that imports perfkit.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _row_label(block: str, batch: int, batches: int) -> str:
    return f"`{block}` (batch {batch})" if batches > 1 else f"`{block}`"


def plot_speedup_heatmap(frame: pd.DataFrame, mode: str, path: Path) -> None:
    """``path``: one mode's speedups over eager, blocks by variants, on a log2 colour scale; cells within noise
    hatched grey, cells that did not run labelled with their status."""
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    variants = ordered_variants(frame)
    rows = block_rows(frame)
    values = np.full((len(rows), len(variants)), np.nan)
    labels = [["" for _ in variants] for _ in rows]
    muted = [[False for _ in variants] for _ in rows]
    by_cell = {(r.block, r.batch, r.variant): r for r in frame.itertuples(index=False)}
    short = {"failed": "FAIL", "oom": "OOM", "error": "ERR", "skipped": "skip", "impossible": "IMPOSS"}
    for i, (block, batch) in enumerate(rows):
        for j, variant in enumerate(variants):
            r = by_cell.get((block, batch, variant))
            if r is None:
                continue
            if r.status != "ok":
                labels[i][j] = short[r.status]
            elif has_value(r.speedup_vs_eager):
                values[i, j] = r.speedup_vs_eager
                labels[i][j] = f"{r.speedup_vs_eager:.2f}" + ("*" if flags(r) else "")
                muted[i][j] = variant != REFERENCE_VARIANT and within_noise(r)
    finite = values[np.isfinite(values)]
    spread = max(abs(np.log2(finite)).max(), 0.1) if finite.size else 1.0
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(variants), 1.0 + 0.45 * len(rows)))
    image = ax.imshow(np.log2(values), cmap="RdYlGn", norm=TwoSlopeNorm(0.0, -spread, spread), aspect="auto")
    for i in range(len(rows)):
        for j in range(len(variants)):
            if muted[i][j]:
                # Within noise: grey and hatched over its colour, so it never reads as a win or a loss.
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", edgecolor="0.5", hatch="///",
                                       lw=0))
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    batches = frame.groupby("block")["batch"].nunique()
    ax.set_yticks(range(len(rows)), [_row_label(b, n, batches[b]).replace("`", "") for b, n in rows])
    ax.set_title(f"{mode}: speedup over eager (median step time)\nhatched: 95% interval contains 1.0; "
                 "*: noisy, contended, launch-bound or throttled", fontsize=9)
    fig.colorbar(image, ax=ax, label="log2 speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_memory_bars(frame: pd.DataFrame, mode: str, memory_column: str, path: Path) -> None:
    """``path``: one mode's peak memory (``memory_column``) of each ok cell, bars grouped by block."""
    plt = pyplot()
    ok = frame[(frame["status"] == "ok") & frame[memory_column].notna()]
    variants = ordered_variants(ok)
    rows = block_rows(ok)
    by_cell = {(r.block, r.batch, r.variant): getattr(r, memory_column) for r in ok.itertuples(index=False)}
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.4 * len(rows) * max(len(variants), 1)), 4.0))
    for j, variant in enumerate(variants):
        heights = [by_cell.get((b, n, variant), np.nan) / 2**20 for b, n in rows]
        ax.bar(np.arange(len(rows)) + j * width, heights, width, label=variant)
    ax.set_xticks(np.arange(len(rows)) + width * (len(variants) - 1) / 2, [b for b, _ in rows], rotation=30,
                  ha="right")
    ax.set_ylabel(f"{memory_column.replace('_bytes', '').replace('_', ' ')} (MiB)")
    ax.set_title(f"{mode}: peak memory of a step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roofline(blocks: pd.DataFrame, kernels: pd.DataFrame, ceilings: dict[str, float], path: Path) -> None:
    """Blocks by arithmetic intensity against the measured ceilings; kernels' GB/s against copy bandwidth.
    A panel is drawn only where it has points; a ceiling only where one was measured."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    panels = [p for p, data in (("roof", blocks), ("bandwidth", kernels)) if not data.empty]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    axes = dict(zip(panels, axes[0], strict=True))
    copy = ceilings.get("copy_gb_per_s")
    if "roof" in axes:
        ax = axes["roof"]
        modes = {"inference": "o", "training": "^"}
        for i, (variant, cells) in enumerate(blocks.groupby("variant", sort=True)):
            for mode, mode_cells in cells.groupby("mode"):
                ax.scatter(mode_cells["intensity"], mode_cells["tflops"], s=22, marker=modes.get(mode, "s"),
                           color=f"C{i % 10}", label=f"{variant} {mode}")
        for _, r in blocks[blocks["variant"] == REFERENCE_VARIANT].iterrows():
            ax.annotate(r["block"], (r["intensity"], r["tflops"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        xs = np.logspace(np.log10(blocks["intensity"].min() / 3), np.log10(blocks["intensity"].max() * 3), 200)
        for style, dtype in zip(("-", "--", ":", "-."), sorted(set(blocks["dtype"])), strict=False):
            peak = peak_tflops(ceilings, dtype)
            if copy or peak:
                roof = np.minimum(xs * copy / 1e3 if copy else np.inf, peak or np.inf)
                ax.plot(xs, roof, "k" + style, lw=1, label=f"ceiling {dtype}: " + ", ".join(
                    t for t in (f"{copy:.0f} GB/s" if copy else "", f"{peak:g} TFLOP/s" if peak else "") if t))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("arithmetic intensity (FLOP / lower bound of bytes moved)")
        ax.set_ylabel("achieved TFLOP/s")
        ax.set_title("blocks" + ("" if copy or any(peak_tflops(ceilings, d) for d in set(blocks["dtype"]))
                                 else " (no measured ceiling for this device)"), fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    if "bandwidth" in axes:
        ax = axes["bandwidth"]
        labels = (kernels["block"] + " " + kernels["variant"] + " " + kernels["mode"]).tolist()
        ax.barh(range(len(labels)), kernels["gbps"])
        for i, value in enumerate(kernels["gbps"]):
            ax.annotate(f"{value:.3g}", (value, i), fontsize=7, xytext=(2, -3), textcoords="offset points")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        if copy:
            ax.axvline(copy, color="k", lw=1, label=f"copy {copy:.0f} GB/s")
            ax.legend(fontsize=8)
        ax.set_xlabel("achieved GB/s (bytes the kernel must move / median time)")
        ax.set_title("kernels" + ("" if copy else " (no measured copy bandwidth for this device)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
