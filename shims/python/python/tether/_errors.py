"""tether's Python exception."""

from __future__ import annotations


class EngineError(Exception):
    """A typed engine error: ``kind`` is one of tether's error kinds
    (``"InvalidArgument"``, ``"ResourceExhausted"``, ``"BackendStreamIncomplete"``, ...).

    An engine raises it to end a request with an error of that kind (any other exception
    becomes ``"BackendUnknown"``); ``Adapter.generate`` raises it for a setup error.
    """

    def __init__(self, message: str, kind: str = "Unknown") -> None:
        super().__init__(message, kind)
        self.message = message
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"
