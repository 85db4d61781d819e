"""The ``triton`` variant: swap the fused-kernel modules into a reference model, sharing its parameters."""
