"""Reading results: a results file's records and its run, device names, cells, and a device's ceilings.

``perfkit report``, ``compare``, ``history``, the matrix's shards and the benchmarks read results through this
module alone, so a file reads the same whichever of them opens it. It knows nothing of reports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfkit.env.device import cpu_isa
from perfkit.record import SCHEMA, Record

UNTIMED_CELLS_KEYS = ("perfkit_skipped_cells", "perfkit_failed_cells")
"""Top-level keys of a pytest-benchmark JSON under which the matrix keeps the records of cells it did not
time (pytest-benchmark writes only benchmarks that ran): skipped, and failed/oom/error."""
CEILINGS_FILE = "ceilings.json"
"""Optional file in a device folder: ``{"copy_gb_per_s": ..., "bf16_tflops": ...}`` measured on that device."""
EXACT_MEMORY_METHODS = ("torch.profiler", "torch.cuda.max_memory_allocated", "cuda caching allocator")
"""Prefixes of ``memory_method`` whose figures repeat exactly for the same code, shape and variant: the CPU
profiler's allocator events, and the CUDA caching allocator's peak statistics."""


class ResultsError(ValueError):
    """A results file that cannot be read as perfkit results; the message names the file and the problem."""


@dataclass
class Results:
    """The records of one results file and what the file says about the run that made it."""

    path: str
    records: list[Record]
    run: dict[str, Any] = field(default_factory=dict)
    """datetime, commit, command and machine_info where the file has them (pytest-benchmark JSON only)."""


def _record(data: Any, where: str) -> Record:
    if not isinstance(data, dict):
        raise ResultsError(f"{where}: expected a perfkit record (a JSON object), got {type(data).__name__}")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ResultsError(f"{where}: record schema {schema!r}; this perfkit reads {SCHEMA!r}")
    try:
        return Record.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ResultsError(f"{where}: not a valid perfkit record: {exc}") from None


def _from_pytest_benchmark(data: dict[str, Any], path: str) -> Results:
    records = []
    for i, bench in enumerate(data["benchmarks"]):
        where = f"{path}: benchmarks[{i}] ({bench.get('fullname', bench.get('name', '?'))})"
        extra = bench.get("extra_info") or {}
        if "schema" not in extra:
            raise ResultsError(f"{where}: extra_info holds no perfkit record (no 'schema' key); "
                               "was this file written by perfkit's benchmarks/?")
        record = _record(extra, where)
        # The record's own rounds come first: for kernel cells they are device-event times after an L2
        # flush, where pytest-benchmark's stats.data holds host-clock times with launch latency. For
        # block cells the two are the same list; stats.data serves files whose records lack them.
        rounds = (bench.get("stats") or {}).get("data")
        if rounds and not record.times_s:
            record.times_s = [float(t) for t in rounds]
        records.append(record)
    for key in UNTIMED_CELLS_KEYS:
        for i, extra in enumerate(data.get(key) or []):
            records.append(_record(extra, f"{path}: {key}[{i}]"))
    machine = data.get("machine_info") or {}
    for record in records:
        _complete_cpu_identity(record.device, machine)
    commit = data.get("commit_info") or {}
    run = {
        "datetime": data.get("datetime"),
        "commit": commit.get("id"),
        "commit_time": commit.get("time"),
        "commit_dirty": commit.get("dirty"),
        "branch": commit.get("branch"),
        "command": machine.get("perfkit_command") or data.get("perfkit_command"),
        "profile": machine.get("perfkit_profile") or data.get("perfkit_profile"),
        "machine_info": machine,
    }
    return Results(path, records, {k: v for k, v in run.items() if v is not None})


def load_results(path: str | Path) -> Results:
    """Read a pytest-benchmark JSON or a JSON-lines file of records; ResultsError says what is wrong."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ResultsError(f"{path}: not a text file (expected JSON or JSON lines)") from None
    if not text.strip():
        raise ResultsError(f"{path}: empty file (expected pytest-benchmark JSON or perfkit JSON lines)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole_error:
        # Not one JSON document: JSON lines, one record per line.
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                # A first line that is not JSON on its own means one (broken) JSON document, whose parser
                # error knows the line and column; a later line is a broken line of a JSON-lines file.
                line_no, bad = (whole_error.lineno, whole_error) if n == 1 else (n, exc)
                raise ResultsError(f"{path}: line {line_no}, column {bad.colno}: invalid JSON: {bad.msg}") from None
            records.append(_record(item, f"{path}: line {n}"))
        return Results(path, records)
    if isinstance(data, dict) and "benchmarks" in data:
        if not isinstance(data["benchmarks"], list):
            raise ResultsError(f"{path}: 'benchmarks' is not a list; not a pytest-benchmark JSON file")
        return _from_pytest_benchmark(data, path)
    if isinstance(data, dict) and "schema" in data:
        return Results(path, [_record(data, f"{path}: line 1")])
    raise ResultsError(f"{path}: neither a pytest-benchmark JSON file (no 'benchmarks' list) nor perfkit "
                       "JSON lines (one record with a 'schema' key per line)")


# ---------------------------------------------------------------------------------------------- devices

def device_name(device: dict[str, Any]) -> str:
    """The device's marketing name: the GPU's name, else the CPU model, else ``"unknown device"``."""
    for key in ("name", "gpu_name", "cpu_model", "cpu", "processor"):
        value = device.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return "unknown device"


def device_slug(device: dict[str, Any]) -> str:
    """A folder name that tells machines apart: ``"nvidia-h100-80gb-hbm3-79gib"``, ``"cpu-amd-epyc-2c-avx2"``.

    A GPU is its name and memory; a CPU its model, core count and widest ISA (``perfkit.env.device.ISA_LEVELS``),
    since two "AMD EPYC" virtual machines may differ in both. Only the hardware counts, never the driver or
    library versions: a regression against last month's torch on the same machine is exactly the comparison
    a report folder exists for. The record keeps the full identity.
    """
    name = device_name(device)
    slug = re.sub(r"\(r\)|\(tm\)|\bcpu\b|@.*$", " ", name.lower())
    is_cpu = device.get("type") == "cpu"
    if is_cpu:
        slug += "".join(f" {part}" for part in (f"{device['cores']}c" if device.get("cores") else None,
                                                 device.get("isa")) if part)
    elif device.get("total_memory_bytes"):
        slug += f" {round(device['total_memory_bytes'] / 2**30)}gib"
    slug = re.sub(r"[^a-z0-9.]+", "-", slug).strip("-.")
    slug = re.sub(r"-+", "-", slug) or "unknown"
    return f"cpu-{slug}" if is_cpu and not slug.startswith("cpu") else slug


def _complete_cpu_identity(device: dict[str, Any], machine: dict[str, Any]) -> None:
    """Fill the CPU fields a record written before they existed lacks from pytest-benchmark's ``machine_info``.

    pytest-benchmark keeps py-cpuinfo's flags, family and model, so an old run still gets its ISA (and its
    folder name) from what was recorded on its own machine, never from the machine reading it.
    """
    cpu = machine.get("cpu") or {}
    if device.get("type") != "cpu" or "isa" in device or not cpu.get("flags"):
        return
    device["isa"] = cpu_isa(cpu["flags"])
    device.setdefault("vendor", cpu.get("vendor_id_raw"))
    device.setdefault("cpu_family", str(cpu["family"]) if "family" in cpu else None)
    device.setdefault("cpu_model_id", str(cpu["model"]) if "model" in cpu else None)


# ------------------------------------------------------------------------------------------------ cells

def cell_key(record: Record) -> tuple:
    """What makes two records the same cell on the same device."""
    return (device_slug(record.device), record.kind, record.block, record.variant, record.mode, record.dtype,
            record.batch)


def merge_records(results: Iterable[Results]) -> list[Record]:
    """Every record of ``results`` in order, a later record of the same cell replacing an earlier one.

    A JSON-lines file grows run after run, so its last record of a cell is the current one.
    """
    merged: dict[tuple, Record] = {}
    for result in results:
        for record in result.records:
            merged.pop(cell_key(record), None)
            merged[cell_key(record)] = record
    return list(merged.values())


def memory_is_exact(record: Record) -> bool:
    """Whether the record's peak memory repeats exactly for the same code (``EXACT_MEMORY_METHODS``)."""
    method = (record.memory_method or "").lower()
    return any(method.startswith(m.lower()) for m in EXACT_MEMORY_METHODS)


def read_ceilings(device_dir: Path, copy_gbps: float | None) -> dict[str, float]:
    """The device's measured ceilings: ``ceilings.json`` in its folder, ``copy_gbps`` overriding the copy rate."""
    ceilings: dict[str, float] = {}
    path = device_dir / CEILINGS_FILE
    if path.exists():
        try:
            ceilings = {k: float(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise ResultsError(f"{path}: expected {{\"copy_gb_per_s\": number, \"bf16_tflops\": number}}: {exc}"
                               ) from None
    if copy_gbps is not None:
        ceilings["copy_gb_per_s"] = float(copy_gbps)
    return ceilings
