"""Training methods: how to prepare a model and how to step it."""

from wasi_tool.methods.optim import SubspaceSGD

__all__ = ["SubspaceSGD"]
