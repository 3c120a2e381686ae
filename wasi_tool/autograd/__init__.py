"""torch.autograd.Function subclasses only; they call wasi_tool.ops."""

from wasi_tool.autograd.functions import ASIFunction, GradSink, WASIFunction, WSIFunction

__all__ = ["ASIFunction", "GradSink", "WASIFunction", "WSIFunction"]
