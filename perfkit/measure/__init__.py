"""Measuring one cell: timing, the correctness gate, FLOPs and memory."""
from perfkit.measure.cell import *  # noqa: F401,F403
from perfkit.measure.cell import _reference  # noqa: F401
