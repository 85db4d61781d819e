"""Reference implementations of every block and network; importing this package registers them."""

from perfkit.blocks import densenet  # noqa: F401
