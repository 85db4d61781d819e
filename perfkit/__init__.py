"""perfkit: a profiling and optimization harness for the building blocks of modern CNNs."""

from perfkit.registry import Entry, create, get_entry, list_blocks, register

__all__ = ["Entry", "create", "get_entry", "list_blocks", "register"]
__version__ = "0.1.0"
