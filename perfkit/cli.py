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
    from perfkit.flops import count_flops
    from perfkit.registry import get_entry, list_blocks

    names = list_blocks(args.pattern, kind=args.kind)
    if not names:
        print(f"no block or network matches {args.pattern!r}; `perfkit list` shows them all", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        entry = get_entry(name)
        module = entry.create()
        params = sum(p.numel() for p in module.parameters())
        flops = count_flops(name, batch=1, bench=True)
        rows.append((name, entry.kind, f"{params:,}", _format_count(flops), "x".join(map(str, entry.bench_shape)),
                     entry.description))
    header = ("name", "kind", "params", "FLOPs/sample", "input (C,H,W)", "description")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list blocks and networks with parameters, FLOPs and input shape")
    p.add_argument("pattern", nargs="?", default="*", help="glob over names, e.g. 'resnet*' (default: all)")
    p.add_argument("--kind", choices=("block", "network"), help="only blocks or only networks")
    p.set_defaults(func=_cmd_list)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="perfkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_list(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``perfkit`` console script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError) as exc:
        print(f"perfkit {args.command}: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
