"""Python side of each op: custom-op wrappers, fake kernels, autograd, and references."""
