"""The one error type the library raises for bad input or a failed stage."""

from __future__ import annotations


class WasiToolError(Exception):
    """A problem the user can fix: bad input, a missing file, weights that do not fit.

    The CLI prints ``str(error)`` on one line and exits with code 1; library callers catch it.
    """

    def __str__(self) -> str:
        # Keep the message on one line whatever a wrapped exception carried.
        return " ".join(super().__str__().split())
