"""The identity of the device a measurement ran on, carried in every record and in the JSON's machine_info.

A timing means nothing without the machine: GPU name, memory, SM count, compute capability, driver, CUDA,
torch and triton versions (and the memory bandwidth from nvidia-ml-py where it is installed), or the CPU
model, vendor, family, widest ISA and core count. Queried when asked, never at import.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


ISA_LEVELS = (("amx", ("amx_tile",)), ("avx512", ("avx512f",)), ("avx2", ("avx2",)), ("avx", ("avx",)),
              ("sse4.2", ("sse4_2",)), ("sve", ("sve",)), ("neon", ("asimd", "neon")))
"""The widest vector instruction set a CPU's flags name, widest first: what CPU convolutions are built on, so
two machines with the same model string but a different ISA get different report folders."""


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_isa(flags: list[str] | str) -> str | None:
    """The widest ISA of ``ISA_LEVELS`` among a CPU's ``flags`` (a list or /proc/cpuinfo's line), else None."""
    present = set(flags.split() if isinstance(flags, str) else flags)
    return next((name for name, needed in ISA_LEVELS if present & set(needed)), None)


def _nvml(index: int) -> dict[str, Any]:
    """Driver version and theoretical memory bandwidth from NVML; empty when nvidia-ml-py is absent."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        driver = pynvml.nvmlSystemGetDriverVersion()
        memory_clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_width_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
    except pynvml.NVMLError as error:
        return {"nvml_error": str(error)}
    # Double data rate: two transfers per memory clock, bus_width_bits / 8 bytes each.
    return {
        "driver": driver.decode() if isinstance(driver, bytes) else driver,
        "memory_bandwidth_gb_per_s": 2 * memory_clock_mhz * 1e6 * bus_width_bits / 8 / 1e9,
    }


@functools.cache
def _identity(device_str: str) -> tuple[tuple[str, Any], ...]:
    device = torch.device(device_str)
    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            name=props.name,
            total_memory_bytes=int(props.total_memory),
            sm_count=int(props.multi_processor_count),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=None,
        )
        info.update(_nvml(index))
    else:
        cpuinfo = _cpuinfo()
        info.update(
            name=cpuinfo.get("model name") or platform.processor() or platform.machine(),
            vendor=cpuinfo.get("vendor_id"),
            cpu_family=cpuinfo.get("cpu family"),
            cpu_model_id=cpuinfo.get("model"),
            isa=cpu_isa(cpuinfo.get("flags") or cpuinfo.get("Features") or ""),
            cores=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
            machine=platform.machine(),
        )
    return tuple(info.items())


def device_identity(device: torch.device | str) -> dict[str, Any]:
    """A JSON-ready dict naming ``device``: ``name`` is the GPU or CPU model, the rest its particulars."""
    return dict(_identity(str(torch.device(device))))


def default_device() -> torch.device:
    """CUDA when a GPU is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a device this machine has (None: :func:`default_device`); ValueError naming the valid ones."""
    if name is None:
        return default_device()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    valid = "cpu" + (f", cuda, cuda:0..cuda:{count - 1}" if count else " (no CUDA GPU is available here)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a torch device; valid here: {valid}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and (device.index or 0) >= count):
        raise ValueError(f"device {name!r} is not available; valid here: {valid}")
    return device


def check_batch(batch: int) -> int:
    """``batch`` if it is a positive integer, else ValueError."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch {batch!r} must be a positive integer (1 or more)")
    return batch
