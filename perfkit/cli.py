"""The ``perfkit`` command line: one subcommand per job (``perfkit list``, ...)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _cmd_list(args: argparse.Namespace) -> int:
    import torch

    from perfkit.measure import step_flops
    from perfkit.registry import get_entry, list_blocks

    names = list_blocks(args.pattern, kind=args.kind)
    if not names:
        print(f"no block or network matches {args.pattern!r}; `perfkit list` shows them all", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        entry = get_entry(name)
        # On the meta device: counting parameters needs no storage, and VGG's 138M would take seconds to init.
        with torch.device("meta"):
            module = entry.create()
        params = sum(p.numel() for p in module.parameters())
        flops = step_flops(entry, 1, bench_shape=True, mode="inference", input_requires_grad=False)
        rows.append((name, entry.kind, f"{params:,}", _format_count(flops), "x".join(map(str, entry.bench_shape)),
                     entry.description))
    header = ("name", "kind", "params", "FLOPs/sample", "input (C,H,W)", "description")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list blocks and networks with parameters, FLOPs and input shape")
    p.add_argument("pattern", nargs="?", default="*", help="glob over names, e.g. 'resnet*' (default: all)")
    p.add_argument("--kind", choices=("block", "network"), help="only blocks or only networks")
    p.set_defaults(func=_cmd_list)


def _cmd_report(args: argparse.Namespace) -> int:
    from perfkit.report import build_reports

    folders = build_reports(args.results, args.output, copy_gbps=args.copy_gbps)
    for folder in folders:
        print(f"wrote {folder / 'README.md'}")
    print(f"wrote {args.output.rstrip('/')}/README.md (index of every device report there)")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="per-device README, summary.csv and plots from benchmark results")
    p.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json) or JSON-lines files")
    p.add_argument("-o", "--output", default="reports", help="reports folder; one sub-folder per device "
                   "(default: reports)")
    p.add_argument("--copy-gbps", type=float, help="the device's measured copy bandwidth in GB/s, for the "
                   "kernels' fraction of it (default: ceilings.json in the device folder, if any)")
    p.set_defaults(func=_cmd_report)


def _cmd_compare(args: argparse.Namespace) -> int:
    from perfkit.compare import parse_threshold, run_compare

    status, text = run_compare(args.base, args.new, threshold=parse_threshold(args.threshold),
                               cross_device=args.allow_cross_device, fmt=args.format)
    print(text, file=sys.stderr if status == 2 else sys.stdout, end="" if text.endswith("\n") else "\n")
    return status


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare two runs cell by cell; exit 1 on a regression, 2 on bad input")
    p.add_argument("base", help="the baseline run (pytest-benchmark JSON or JSON lines)")
    p.add_argument("new", help="the run to check against it")
    p.add_argument("--threshold", default="5%", help="slowdown that counts as a regression when the whole "
                   "confidence interval is beyond it (default: 5%%)")
    p.add_argument("--allow-cross-device", action="store_true",
                   help="compare timings from different devices anyway (they measure the hardware, not the code)")
    p.add_argument("--format", choices=("markdown", "text"), default="markdown", help="output format")
    p.set_defaults(func=_cmd_compare)


def _cmd_baseline(args: argparse.Namespace) -> int:
    from perfkit.compare import BASELINE_PATH, check_baseline, write_baseline

    args.path = args.path or str(BASELINE_PATH)
    if args.write:
        path = write_baseline(args.path)
        print(f"wrote {path}")
        return 0
    problems = check_baseline(args.path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{args.path}: every counter matches")
    return 1 if problems else 0


def _add_baseline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baseline", help="check (or --write) the quick profile's CPU counter baseline")
    p.add_argument("--write", action="store_true", help="recompute the counters and overwrite the baseline, "
                   "on purpose, after a change that is meant to move them")
    p.add_argument("--path", help="baseline file (default: benchmarks/baselines/cpu-quick-counters.json in the "
                   "source tree)")
    p.set_defaults(func=_cmd_baseline)


def _cmd_profile(args: argparse.Namespace) -> int:
    from perfkit.profile import profile_block

    result = profile_block(args.name, variant=args.variant, mode=args.mode, batch=args.batch, device=args.device,
                           out_dir=args.output, bench_shape=args.shape == "bench")
    print(result.table)
    print(f"trace: {result.trace_path}\ntable: {result.table_path}\n"
          f"view: tensorboard --logdir {args.output}   (or open the trace at https://ui.perfetto.dev)")
    return 0


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="torch.profiler trace (TensorBoard/Perfetto) and top-operator table")
    p.add_argument("name", help="block or network name (`perfkit list`)")
    p.add_argument("--variant", default="eager", help="variant, e.g. channels_last+bf16 (default: eager)")
    p.add_argument("--mode", choices=("inference", "training"), default="inference", help="default: inference")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--shape", choices=("bench", "test"), default="bench", help="the entry's benchmark input "
                   "shape or its small test shape (default: bench)")
    p.add_argument("-o", "--output", default="profiles", help="trace folder, TensorBoard's --logdir "
                   "(default: profiles)")
    p.set_defaults(func=_cmd_profile)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="perfkit", description=__doc__.splitlines()[0])
    parser.add_argument("--import", dest="import_modules", metavar="MODULES",
                        help="comma-separated modules whose @perfkit.register calls add blocks, imported before the "
                             "command (also PERFKIT_IMPORT; installed packages use the perfkit.blocks entry points)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_list(sub)
    _add_report(sub)
    _add_compare(sub)
    _add_baseline(sub)
    _add_profile(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``perfkit`` console script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    if args.import_modules:
        import os

        from perfkit.registry import IMPORT_ENV, import_modules

        try:
            import_modules(args.import_modules)
        except ImportError as exc:
            print(f"perfkit --import: {exc}", file=sys.stderr)
            return 2
        # Exported so that the subprocesses a command starts (isolated cells, workers) register them too.
        os.environ[IMPORT_ENV] = args.import_modules
    try:
        return args.func(args)
    except (KeyError, ValueError) as exc:
        print(f"perfkit {args.command}: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
