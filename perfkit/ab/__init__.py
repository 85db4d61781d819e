"""``perfkit ab`` and ``perfkit bisect``: two commits timed against each other, interleaved on one machine.

``worktree`` (the sides), ``worker`` (a side's process and its pipe protocol), ``run`` (the interleaved
rounds, the stopping rule, the verdicts), ``format`` (text, markdown, github), ``command`` (``perfkit ab``)
and ``bisection`` (``perfkit bisect``).
"""

from perfkit.ab.run import AbSettings, CellResult, CellSpec, verdict
from perfkit.ab.worktree import AbInputError, Side

__all__ = ["AbInputError", "AbSettings", "CellResult", "CellSpec", "Side", "verdict"]
