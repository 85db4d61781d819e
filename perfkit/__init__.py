"""perfkit: a profiling and optimization harness for the building blocks of modern CNNs."""

from perfkit.registry import Entry, create, get_entry, list_blocks, register
from perfkit.variants import list_variants, register_variant

__all__ = ["Entry", "create", "get_entry", "list_blocks", "list_variants", "register", "register_variant"]
__version__ = "0.1.0"
