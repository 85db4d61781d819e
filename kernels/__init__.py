"""perfkit's Triton kernels, each module its kernels, launch wrappers and ``torch.library`` ops.

* :mod:`~perfkit.kernels.bn_stats`: BatchNorm batch statistics (Welford/Chan), ``perfkit::bn_stats``;
* :mod:`~perfkit.kernels.wrc`: the weighted-residual epilogue ``relu(alpha·BN(y) + beta·s)``,
  :func:`~perfkit.kernels.wrc.wrc_epilogue` (``perfkit::wrc_epilogue``, ``perfkit::wrc_backward``);
* :mod:`~perfkit.kernels.bn_relu`: fused BatchNorm+ReLU, :func:`~perfkit.kernels.bn_relu.bn_relu`
  (``perfkit::bn_relu``, ``perfkit::bn_relu_backward``);
* :mod:`~perfkit.kernels.dense`: DenseNet's block in one buffer on BN+ReLU,
  :func:`~perfkit.kernels.dense.dense_block` (``perfkit::dense_block_forward``, ``perfkit::dense_block_backward``).

Shared: ``_tiles`` (the tile space of bn_stats and wrc, and the one output allocator) and ``_library`` (how
a kernel becomes an op). Importing this package imports nothing: triton is needed only by the modules.
"""
