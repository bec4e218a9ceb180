"""vaeflow's data layer: raw sources -> prepared arrays -> ``PreparedDataset``.

- :func:`prepare_dataset` converts raw data (``data:`` config section) once into
  ``train.npy``/``val.npy``/``test.npy`` + ``manifest.json``, written atomically.
- :class:`PreparedDataset` reads one split, memory-mapped, as float32 in [0, 1].
- :class:`DataError` is raised for any bad input, naming the file.
"""

from .errors import DataError
from .prepare import check_prepared, load_manifest, prepare_dataset, resolve_data_cfg, split_records
from .sources import SOURCES


def __getattr__(name: str):
    """`PreparedDataset` (a torch Dataset) is imported on first use: `prepare` needs no torch."""
    if name == "PreparedDataset":
        from .dataset import PreparedDataset

        return PreparedDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "check_prepared",
    "DataError",
    "PreparedDataset",
    "SOURCES",
    "load_manifest",
    "prepare_dataset",
    "resolve_data_cfg",
    "split_records",
]
