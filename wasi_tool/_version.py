"""The package version, from the installed metadata when there is one."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("wasi-tool")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
