"""Reference implementations of every block and network; importing this package registers them."""

from perfkit.blocks import alexnet, csp, d2l, densenet, inception, nin, residual, resnet, vgg  # noqa: F401
