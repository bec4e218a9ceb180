"""Refuse a split that leaves train, val or test empty: training needs val (best.pt),
evaluation needs test. Checked after conversion (so a bad file is reported first, and
skipped items count) but before the prepared folder is swapped in: nothing is written.
Only tiny datasets get here, so converting them first costs nothing."""

from __future__ import annotations

from .errors import DataError

SPLITS = ("train", "val", "test")


def _unit(cfg: dict) -> str:
    if cfg["dataset"] == "ct":
        return "patients" if cfg["ct"].get("group_by") == "patient" else "CT series"
    return "groups of items"


def check_split_counts(counts: dict[str, int], n_groups: int, cfg: dict, skipped: int = 0) -> None:
    """Raise DataError when a split is empty. counts: items per split; n_groups: groups split.

    A fraction of 0 asks for an empty split (library use; the config schema requires > 0)."""
    wanted = {"train": True, "val": cfg["split"]["val"] > 0, "test": cfg["split"]["test"] > 0}
    empty = [s for s in SPLITS if wanted[s] and counts.get(s, 0) == 0]
    if not empty:
        return
    unit = _unit(cfg)
    shown = ", ".join(f"{s}={counts.get(s, 0)}" for s in SPLITS)
    why = f"{shown} from {n_groups} {unit}" + (f" after skipping {skipped} bad item(s)" if skipped else "")
    val, test = cfg["split"]["val"], cfg["split"]["test"]
    if n_groups < 3:
        todo = (f"add data: train, val and test each need at least one of the {unit} (3 in all), "
                "which are never divided between splits")
        if cfg["dataset"] == "ct" and cfg["ct"].get("group_by") == "patient":
            todo += " (or set data.ct.group_by: series)"
    else:
        todo = []
        least = (50 // n_groups + 1) / 100  # f * n > 0.5, so round(f * n) >= 1 (half to even)
        for s, f in (("val", val), ("test", test)):
            if s in empty:
                todo.append(f"raise data.split.{s} from {f} to at least {least:.2f}")
        if "train" in empty:
            todo.append(f"lower data.split.val + data.split.test (now {val} + {test})")
        todo = "; ".join(todo) + (f" (or add data: there are {n_groups} {unit})" if todo else "")
    raise DataError(f"data.split: {' and '.join(empty)} would be empty ({why}); nothing was written: {todo}")
