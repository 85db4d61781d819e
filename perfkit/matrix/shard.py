"""The matrix in N disjoint shards balanced by estimated cost, and the checks that merge them back.

``--perfkit-shard K/N`` (1-based K) keeps the cells of shard K. The split is a function of the cell list
and the cost model's estimates on the reference GPU (``perfkit.matrix.plan``) only, never of the machine that
computes it, so every machine of a job array agrees on it: cells in decreasing estimated cost (ties by
name) each go to the shard with the least estimated total so far (ties to the lowest index), the
longest-processing-time rule, within 4/3 of the best possible balance.

``perfkit report`` merges shard results through :func:`check_shard_results`: it refuses two results that
measured one cell on devices that share a name but differ (memory, driver, CUDA...): the report's folder
is per device name, and a cell measured twice there would be one device's figure passed off as the other's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from perfkit.record import Record


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), 1 <= K <= N; ValueError names the valid form."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f"shard {text!r}: give K/N with 1 <= K <= N, e.g. 2/8")
    return int(match[1]), int(match[2])


def assign_shards(costs: dict[str, float], n: int) -> dict[str, int]:
    """Cell -> shard index in 1..n, balancing the summed cost (longest processing time first)."""
    totals = [0.0] * n
    assignment = {}
    for cell in sorted(costs, key=lambda c: (-costs[c], c)):
        shard = min(range(n), key=lambda i: (totals[i], i))
        totals[shard] += costs[cell]
        assignment[cell] = shard + 1
    return assignment


def _device_key(record: Record) -> str:
    return json.dumps(record.device, sort_keys=True)


def check_shard_results(results: Sequence) -> list[str]:
    """Refuse (ValueError) a cell two shard files measured on different devices of one name; warn of gaps.

    ``results`` are ``perfkit.results.load.Results``. Returns warnings (shards of a K/N split that are absent).
    """
    from perfkit.results.load import cell_key, device_name

    seen: dict[tuple, tuple[str, Record]] = {}
    shards: dict[int, set[int]] = {}
    for result in results:
        for record in result.records:
            if not record.shard:
                continue
            key = cell_key(record)
            if key in seen:
                path, other = seen[key]
                if path != result.path and _device_key(other) != _device_key(record):
                    differing = sorted(k for k in set(other.device) | set(record.device)
                                       if other.device.get(k) != record.device.get(k))
                    raise ValueError(
                        f"cell {record.block} {record.variant} {record.mode} b{record.batch} was measured on two "
                        f"different devices named {device_name(record.device)!r} ({path} and {result.path}; they "
                        f"differ in {', '.join(differing)}); report each machine's results separately")
            seen[key] = (result.path, record)
            k, n = parse_shard(record.shard)
            shards.setdefault(n, set()).add(k)
    return [f"shards of {n}: {', '.join(str(k) for k in range(1, n + 1) if k not in present)} missing; the "
            "report covers the others" for n, present in sorted(shards.items()) if len(present) < n]
