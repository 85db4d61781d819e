"""The ``perfkit`` command line: one subcommand per job (``perfkit list``, ...)."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from pathlib import Path


def _output_folder(path: str | Path, option: str) -> None:
    """Create the folder a command writes into before it does any work: a path that cannot be a folder is then
    one message naming it and why (``main`` exits 2), not a traceback, and never after a long run."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            why = f"{existing} is a file, not a folder"
        elif isinstance(error, PermissionError):
            why = f"no permission to create folders in {existing}"
        elif error.errno == errno.EROFS:
            why = f"{existing} is on a read-only file system"
        else:
            why = error.strerror or str(error)
        raise ValueError(f"{option} {path}: cannot create this folder: {why}; give a folder that exists or whose "
                         "nearest existing parent is a folder you can write in") from None


def _format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _cmd_list(args: argparse.Namespace) -> int:
    import torch

    from perfkit.measure import step_flops
    from perfkit.registry import get_entry, list_blocks

    if args.variants:
        return _list_variants(args.pattern)
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


def _list_variants(pattern: str) -> int:
    """``perfkit list --variants``: each variant atom, where it comes from, its dtype and modes, one line on it."""
    from perfkit.user_variants import get_user_variant, variant_plugin_errors
    from perfkit.variants import MODES, VARIANTS, describe_variant, list_variants, parse_variant

    atoms = list_variants(pattern)
    for key, error in variant_plugin_errors().items():
        print(f"perfkit list: a perfkit.variants entry point {key} failed to load: {error}", file=sys.stderr)
    if not atoms:
        print(f"no variant matches {pattern!r}; `perfkit list --variants` shows them all", file=sys.stderr)
        return 2
    rows = [("name", "from", "dtype", "modes", "description")]
    for atom in atoms:
        user = atom not in VARIANTS
        source, modes = (get_user_variant(atom).source, get_user_variant(atom).modes) if user else ("built-in", MODES)
        rows.append((atom, source, parse_variant(atom).compute_dtype, ",".join(modes), describe_variant(atom)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list blocks and networks with parameters, FLOPs and input shape (--variants: "
                       "the variant atoms, built-in and registered)")
    p.add_argument("pattern", nargs="?", default="*", help="glob over names, e.g. 'resnet*' (default: all)")
    p.add_argument("--kind", choices=("block", "network"), help="only blocks or only networks")
    p.add_argument("--variants", action="store_true", help="list the variant atoms (joined with '+' into a variant) "
                   "instead: the built-ins and those registered with perfkit.register_variant or the "
                   "perfkit.variants entry points")
    p.set_defaults(func=_cmd_list)


def _cmd_report(args: argparse.Namespace) -> int:
    from perfkit.matrix.shard import check_shard_results
    from perfkit.results.load import load_results
    from perfkit.results.report import build_reports

    output = args.baseline if args.publish else args.output
    # Shards merge here; a cell two shards measured on different devices of one name is refused before any
    # folder is made.
    for warning in check_shard_results([load_results(p) for p in args.results]):
        print(f"perfkit report: {warning}", file=sys.stderr)
    _output_folder(output, "--baseline" if args.publish else "-o")
    folders = build_reports(args.results, output, copy_gbps=args.copy_gbps,
                            baseline_dir=None if args.no_compare else args.baseline)
    for folder in folders:
        print(f"wrote {folder / 'README.md'}")
    print(f"wrote {str(output).rstrip('/')}/README.md (index of every device report there)")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    from perfkit.results.report import BASELINE_DIR, DEFAULT_OUTPUT

    p = sub.add_parser("report", help="per-device README, summary.csv and plots from benchmark results, "
                       "compared with the committed report of the same device")
    p.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json) or JSON-lines files")
    p.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help="reports folder; one sub-folder per device "
                   f"(default: {DEFAULT_OUTPUT})")
    p.add_argument("--baseline", default=BASELINE_DIR, help="the committed reports folder each device is compared "
                   f"with (default: {BASELINE_DIR})")
    p.add_argument("--no-compare", action="store_true", help="do not compare with the committed reports")
    p.add_argument("--publish", action="store_true", help="write into the --baseline folder instead of --output, "
                   "replacing the committed report (and baseline) of each device on purpose")
    p.add_argument("--copy-gbps", type=float, help="the device's measured copy bandwidth in GB/s, for the "
                   "kernels' fraction of it (default: ceilings.json in the device folder, if any)")
    p.set_defaults(func=_cmd_report)


def _cmd_device(args: argparse.Namespace) -> int:
    from perfkit.results import device_slug, load_results

    # Each distinct device once, in the order the files first name it: a merged run prints one line.
    slugs = list(dict.fromkeys(device_slug(record.device) for path in args.results
                               for record in load_results(path).records))
    if not slugs:
        print(f"perfkit device: no records in {', '.join(args.results)}", file=sys.stderr)
        return 2
    print("\n".join(slugs))
    return 0


def _add_device(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("device", help="print the report folder name of the device the records were measured on "
                       "(one line per device), e.g. reports/$(perfkit device out/bench.json)/")
    p.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json) or JSON-lines files")
    p.set_defaults(func=_cmd_device)


def _cmd_compare(args: argparse.Namespace) -> int:
    from perfkit.results.compare import parse_threshold, run_compare

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


def _cmd_history(args: argparse.Namespace) -> int:
    from perfkit.results.compare import parse_threshold
    from perfkit.results.history import run_history

    _output_folder(args.output, "-o")
    status, text = run_history(args.storage, device=args.device, cells=args.cells,
                               threshold=parse_threshold(args.threshold), out_dir=args.output)
    print(text, file=sys.stderr if status == 2 else sys.stdout, end="" if text.endswith("\n") else "\n")
    return status


def _add_history(sub: argparse._SubParsersAction) -> None:
    from perfkit.results.history import DEFAULT_STORAGE

    p = sub.add_parser("history", help="each cell's median over stored runs by commit: steps, drift, plots; "
                       "exit 1 when the latest run sits on a regression step")
    p.add_argument("storage", nargs="*", default=[DEFAULT_STORAGE], help="pytest-benchmark storage folders "
                   f"(--benchmark-storage) or run JSON files (default: {DEFAULT_STORAGE})")
    p.add_argument("--device", default="*", help="glob over device folder names, e.g. 'cpu-*' (default: all)")
    p.add_argument("--cells", default="*", help="glob over cells block/variant/mode/dtype/bN, e.g. "
                   "'basic/*/training/*' (default: all)")
    p.add_argument("--threshold", default="5%", help="slowdown of a step that fails the gate (default: 5%%)")
    p.add_argument("-o", "--output", default="out/history", help="folder for the PNGs, one per device, block "
                   "and mode (default: out/history)")
    p.set_defaults(func=_cmd_history)


def _cmd_baseline(args: argparse.Namespace) -> int:
    from perfkit.baseline import check_baseline, default_baseline_path, write_baseline

    path = args.path or default_baseline_path()
    if args.write:
        print(f"wrote {write_baseline(path)}")
        return 0
    problems = check_baseline(path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{path}: every counter matches")
    return 1 if problems else 0


def _add_baseline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baseline", help="check (or --write) the CI counter gate's baseline: FLOPs, parameters "
                       "and the memory model's per-category peaks of the quick profile")
    p.add_argument("--write", action="store_true", help="recompute the counters and overwrite the baseline, "
                   "on purpose, after a change that is meant to move them")
    p.add_argument("--path", help="baseline file (default: benchmarks/baselines/cpu-quick-counters.json in the "
                   "checkout perfkit runs from; required when perfkit is installed from a wheel)")
    p.set_defaults(func=_cmd_baseline)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers, e.g. 64,56,56") from None
    if any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: every dimension must be positive")
    return shape


def _cmd_memory(args: argparse.Namespace) -> int:
    import json

    from perfkit.env.device import check_batch
    from perfkit.measure.memory_model import (
        MemoryModelUnavailable,
        default_prediction_device,
        predict_step_memory,
        render,
    )

    check_batch(args.batch)
    try:
        prediction = predict_step_memory(args.name, args.variant, args.mode, args.batch, shape=args.shape,
                                         device=args.device or default_prediction_device(), top_modules=args.top)
    except MemoryModelUnavailable as error:
        print(f"perfkit memory: {error}", file=sys.stderr)
        return 2
    print(json.dumps(prediction.to_dict(), indent=1) if args.json else render(prediction))
    return 0


def _add_memory(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="predict a step's memory by category and module, without running it "
                       "(no GPU needed)")
    p.add_argument("name", help="block or network name (`perfkit list`)")
    p.add_argument("--variant", default="eager", help="variant, e.g. channels_last+bf16 or triton (default: eager)")
    p.add_argument("--mode", choices=("inference", "training"), default="training", help="default: training")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--shape", type=_shape, help="per-sample input shape C,H,W (default: the entry's benchmark shape)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="the allocator to predict for: cuda rounds each "
                   "storage up to 512 bytes and needs a GPU present (default: cuda where a GPU is present, else cpu)")
    p.add_argument("--top", type=int, default=10, help="modules listed, by activation bytes (default: 10)")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.set_defaults(func=_cmd_memory)


def _cmd_profile(args: argparse.Namespace) -> int:
    from perfkit.profile import profile_block

    _output_folder(args.output, "-o")
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


def _cmd_launch(args: argparse.Namespace) -> int:
    import torch

    from perfkit.matrix.launch import SlurmOptions, launch, parse_sbatch

    _output_folder(args.output, "-o")
    _output_folder(args.reports, "--reports")  # merged at the end: an unusable folder would cost the whole run
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    gpus = list(range(torch.cuda.device_count())) if args.executor == "local" and torch.cuda.is_available() else None
    slurm = SlurmOptions(partition=args.partition, gpus=args.gpus, cpus_per_task=args.cpus_per_task, mem=args.mem,
                         account=args.account, qos=args.qos, constraint=args.constraint,
                         sbatch=parse_sbatch(args.sbatch))
    try:
        runs, failures = launch(args.shards, args.executor, args.output, args.reports, benchmarks=args.benchmarks,
                                pytest_args=pytest_args, timeout_min=args.timeout_min, gpus=gpus, slurm=slurm)
    except KeyboardInterrupt:  # launch has cancelled the jobs and said so
        return 130
    for run in runs:
        print(f"shard {run.shard}: pytest exit {run.returncode}; {run.json_path}")
    for failure in failures:
        print(failure, file=sys.stderr)
    if runs:
        print(f"merged {len(runs)} of {args.shards} shards into {args.reports}/")
    return 1 if failures else 0


def _add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run the matrix as N shard jobs (submitit: SLURM or local) and merge them")
    p.add_argument("--shards", type=int, required=True, help="number of shards (jobs)")
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                   help="slurm: a job per shard, asking for the SLURM options below; local: processes on this "
                        "machine, one GPU each where there are GPUs (default: slurm)")
    p.add_argument("--benchmarks", default="benchmarks", help="the benchmark folder (default: benchmarks)")
    p.add_argument("-o", "--output", default="out/launch", help="shard results and job logs (default: out/launch)")
    p.add_argument("--reports", default="out/launch/reports", help="the merged report's folder "
                   "(default: out/launch/reports)")
    p.add_argument("--timeout-min", type=int, default=60, help="each job's time limit in minutes, sbatch --time "
                   "(default: 60)")
    slurm = p.add_argument_group("SLURM options (--executor slurm; each becomes the sbatch flag named, unset ones "
                                 "leave the cluster's default)")
    slurm.add_argument("--partition", help="sbatch --partition")
    slurm.add_argument("--gpus", type=int, metavar="N", help="GPUs per job, sbatch --gpus-per-node=N (default: 1 "
                       "when the matrix runs on CUDA; 0, no flag, for a --perfkit-device=cpu matrix or when sinfo "
                       "shows no GPU on the partition's nodes)")
    slurm.add_argument("--cpus-per-task", type=int, metavar="N", help="sbatch --cpus-per-task=N")
    slurm.add_argument("--mem", help="memory per job, sbatch --mem (e.g. 16G)")
    slurm.add_argument("--account", help="sbatch --account")
    slurm.add_argument("--qos", help="sbatch --qos")
    slurm.add_argument("--constraint", help="node features, sbatch --constraint (e.g. a100)")
    slurm.add_argument("--sbatch", action="append", metavar="KEY[=VALUE]", help="any other sbatch option, "
                       "sbatch --KEY=VALUE (or --KEY); repeatable, e.g. --sbatch reservation=maint --sbatch exclusive")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="after --: options for each shard's pytest, e.g. -- --perfkit-profile=full")
    p.set_defaults(func=_cmd_launch)


def _cmd_ab(args: argparse.Namespace) -> int:
    from perfkit.ab.command import run_ab

    return run_ab(args)


def _add_ab(sub: argparse._SubParsersAction) -> None:
    from perfkit.ab.command import add_ab_arguments

    p = sub.add_parser("ab", help="time two commits (or checkouts) against each other, rounds interleaved; exit 1 "
                       "on a regression, 2 on bad input (docs/ci.md)")
    add_ab_arguments(p)
    p.set_defaults(func=_cmd_ab)


def _cmd_bisect(args: argparse.Namespace) -> int:
    from perfkit.ab.bisection import run_bisect

    return run_bisect(args)


def _add_bisect(sub: argparse._SubParsersAction) -> None:
    from perfkit.ab.bisection import add_bisect_arguments

    p = sub.add_parser("bisect", help="the first commit between GOOD and BAD where a cell slowed, each step an "
                       "interleaved A/B against GOOD")
    add_bisect_arguments(p)
    p.set_defaults(func=_cmd_bisect)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="perfkit", description="Profile and optimize CNN building blocks: one "
                                     "subcommand per job (perfkit COMMAND --help for its options).")
    parser.add_argument("--import", dest="import_modules", metavar="MODULES",
                        help="comma-separated modules whose @perfkit.register calls add blocks, imported before the "
                             "command (also PERFKIT_IMPORT; installed packages use the perfkit.blocks entry points)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_list(sub)
    _add_report(sub)
    _add_device(sub)
    _add_compare(sub)
    _add_history(sub)
    _add_baseline(sub)
    _add_memory(sub)
    _add_profile(sub)
    _add_launch(sub)
    _add_ab(sub)
    _add_bisect(sub)
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
