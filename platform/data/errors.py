"""The data sets' one error: bad or missing data, said in one line before any work (a `fliqs.errors.BadInput`)."""

from __future__ import annotations

from fliqs.errors import BadInput


class DataError(BadInput):
    pass
