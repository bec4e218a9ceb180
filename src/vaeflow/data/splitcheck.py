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


GRID = [i / 100 for i in range(1, 100)]  # fractions a hint may propose: two decimals


def _nearest_fractions(counts_at, val: float, test: float, wanted: dict[str, bool]):
    """The (val, test) fractions nearest to the current ones (two decimals) for which
    counts_at leaves no wanted split empty, or None. counts_at counts only kept items, so the
    answer holds after skipping bad files."""
    vals = sorted({val, *GRID}) if wanted["val"] else [val]
    tests = sorted({test, *GRID}) if wanted["test"] else [test]
    best = None
    for v in vals:
        for t in tests:
            if v + t >= 1:
                continue
            got = counts_at(v, t)
            if all(got[s] > 0 for s in SPLITS if wanted[s]):
                key = (round(abs(v - val) + abs(t - test), 6), v, t)
                best = key if best is None or key < best else best
    return None if best is None else best[1:]


def check_split_counts(counts: dict[str, int], n_groups: int, cfg: dict, skipped: int = 0,
                       counts_at=None) -> None:
    """Raise DataError when a split is empty. counts: items per split; n_groups: groups split;
    counts_at: (val, test) -> kept items per split (vaeflow.data.prepare.kept_counts_at), so
    the hint is a pair of fractions that works with the files that were skipped.

    A fraction of 0 asks for an empty split (library use; the config schema requires > 0)."""
    wanted = {"train": True, "val": cfg["split"]["val"] > 0, "test": cfg["split"]["test"] > 0}
    empty = [s for s in SPLITS if wanted[s] and counts.get(s, 0) == 0]
    if not empty:
        return
    unit = _unit(cfg)
    shown = ", ".join(f"{s}={counts.get(s, 0)}" for s in SPLITS)
    why = f"{shown} from {n_groups} {unit}" + (f" after skipping {skipped} bad item(s)" if skipped else "")
    usable = getattr(counts_at, "usable_groups", None)
    if skipped and usable is not None:
        why += f", which leaves {usable} of the {unit} with usable items"
    val, test = cfg["split"]["val"], cfg["split"]["test"]
    found = _nearest_fractions(counts_at, val, test, wanted) if counts_at is not None and n_groups >= 3 else None
    if n_groups < 3:
        todo = (f"add data: train, val and test each need at least one of the {unit} (3 in all), "
                "which are never divided between splits")
        if cfg["dataset"] == "ct" and cfg["ct"].get("group_by") == "patient":
            todo += " (or set data.ct.group_by: series)"
    elif counts_at is not None and found is None:
        todo = (f"no data.split fractions give train, val and test a usable item: add data"
                + (" or fix the skipped files (listed with data.skip_bad: false)" if skipped else ""))
    elif counts_at is not None:
        todo = []
        for s, old, new in (("val", val, found[0]), ("test", test, found[1])):
            if new == old:
                continue
            if skipped:  # which groups hold usable items decides it: exactly this value works
                todo.append(f"set data.split.{s} to {new:.2f} (now {old})")
            else:  # every group is usable: any larger value works too
                todo.append(f"{'raise' if new > old else 'lower'} data.split.{s} from {old} to at "
                            f"{'least' if new > old else 'most'} {new:.2f}")
        todo = "; ".join(todo) + f" (or add data: there are {n_groups} {unit})"
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
