"""Registry of raw-data sources, selected by ``data.dataset``."""

from __future__ import annotations

import importlib

from ..errors import DataError
from .base import Record, Source

# name -> "module:Class"; imported lazily so optional deps (pydicom) load only when used.
SOURCES: dict[str, str] = {
    "digits": "digits:DigitsSource",
    "mnist": "mnist:MnistSource",
    "celeba": "celeba:CelebASource",
    "image_dir": "image_dir:ImageDirSource",
    "ct": "ct:CTSource",
}


def get_source(name: str) -> type[Source]:
    try:
        target = SOURCES[name]
    except KeyError:
        raise DataError(f"data.dataset '{name}' is unknown; choose one of {', '.join(SOURCES)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


__all__ = ["SOURCES", "Record", "Source", "get_source"]
