"""The matrix: one benchmark per block/network x variant x mode x batch (options: docs/matrix.md)."""


def test_matrix(perfkit_measure, block: str, variant: str, mode: str, dtype: str, batch: int) -> None:
    """Measure one cell; its record is pytest-benchmark's extra_info and a line of the JSON-lines file."""
    perfkit_measure(block, variant, mode, batch)
