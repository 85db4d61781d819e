"""The device's ceilings (perfkit/env/ceilings.py), measured in the same run: ``<out>/ceilings/<device>/ceilings.json``.

The folder is named as the report names the device's folder, so ``cp -r out/ceilings/. reports/`` puts the
file where ``perfkit report`` reads it (``make bench-gpu`` does).
"""

import pytest

from perfkit.env.ceilings import measure_ceilings, write_ceilings
from perfkit.env.device import device_identity
from perfkit.results.load import device_slug


def test_ceilings(perfkit_matrix) -> None:
    """Copy bandwidth and bf16 matmul throughput of the matrix's GPU."""
    device = perfkit_matrix.device
    if device.type != "cuda":
        pytest.skip("ceilings are measured on a GPU (CUDA events; a CPU's are not what the report's roofline is for)")
    if not perfkit_matrix.profile.ceilings:
        pytest.skip(f"the {perfkit_matrix.profile_name} profile measures no ceilings")
    ceilings = measure_ceilings(device)
    path = write_ceilings(ceilings, perfkit_matrix.jsonl.parent / "ceilings" / device_slug(device_identity(device)))
    print(f"{path}: {ceilings}")
