"""The one exception the data layer raises for bad input."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing input data (or data config).

    The message always names the offending file, folder or config key, so the
    CLI can print it as-is (no traceback) and exit non-zero.
    """
