"""The error of `fliqs export` (`fliqs.export.pytorch` and `fliqs.export.onnx` raise it)."""

from __future__ import annotations

from fliqs.errors import BadInput


class ExportError(BadInput):
    """A model or an option the exporter cannot express: one line."""
