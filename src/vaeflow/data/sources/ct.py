"""``ct``: low-dose CT slices (2D) or volumes (3D) from DICOM or .npy files.

``data.ct.format: dicom`` reads every ``.dcm``/``.dicom``/``.ima`` file (or file
without extension) under ``data.root`` with pydicom, converts stored values to
Hounsfield units with ``RescaleSlope``/``RescaleIntercept``, then maps the HU
window ``data.ct.hu_window`` ([low, high], default [-1000, 1000]) linearly to
[0, 1] (clipped). Slices are grouped into series by ``SeriesInstanceUID`` (or by
``PatientID`` with ``data.ct.group_by: patient``) and sorted by position along
the slice normal (``ImagePositionPatient`` . normal from
``ImageOrientationPatient``; then ``SliceLocation``, ``InstanceNumber``, name).

``data.ct.format: npy`` reads ``*.npy`` arrays: ``[H, W]`` (one slice) or
``[S, H, W]`` (a stack of slices in order). Values are HU (windowed as above)
with ``data.ct.npy_values: hu``, or already in [0, 1] with ``unit``. A 3D file is
its own group; 2D files in one sub-folder form a group.

``spatial_dims: 2`` yields one item per slice, ``[C, H, W]``. ``spatial_dims: 3``
yields non-overlapping blocks of ``data.ct.volume_depth`` consecutive slices per
series, ``[C, D, H, W]`` (a series shorter than that is a bad item). Slices are
resized in-plane to ``data.image_size`` (shorter side, then center crop); depth
is never resampled. Splits are made per group, so no series (patient) is split
between train and test. Stored as uint16 by default (``data.dtype: auto``).
"""

from __future__ import annotations

import io
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Record, Source, require_root, resize_square, to_channels, walk_files

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima", ""}


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataError("data.dataset: ct with data.ct.format: dicom needs pydicom (pip install pydicom)") from None
    return pydicom


def natural_key(text: str) -> tuple:
    """'slice10' after 'slice9'."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


class _Bad:
    """Stands in for a record's ref when scanning already found it bad."""

    def __init__(self, error: DataError):
        self.error = error


class CTSource(Source):
    name = "ct"
    default_channels = 1

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.root = require_root(cfg, self.name)
        ct = cfg["ct"]
        self.format = ct["format"]
        self.lo, self.hi = ct["hu_window"]
        self.depth = ct["volume_depth"]
        self.volumes = cfg["spatial_dims"] == 3
        self.group_by = ct.get("group_by", "series")
        self.npy_values = ct.get("npy_values", "hu")
        self._cache: OrderedDict[str, object] = OrderedDict()
        self.n_series = 0

    # -- scanning ---------------------------------------------------------
    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _list(self, suffixes: set[str], what: str) -> list[Path]:
        files = walk_files(self.root)
        keep = [p for p in files if p.suffix.lower() in suffixes]
        self.ignored = [self._key(p) for p in files if p.suffix.lower() not in suffixes]
        if not keep:
            if self.ignored:
                raise DataError(f"{self.root}: no {what} found ({len(self.ignored)} other files, e.g. "
                                f"{', '.join(self.ignored[:3])})")
            raise DataError(f"{self.root}: folder is empty, no {what} found")
        return keep

    def records(self) -> list[Record]:
        slices, bad = self._scan_dicom() if self.format == "dicom" else self._scan_npy()
        # slices: series id -> list of (sort key, key, ref); bad: list of Records already failed
        if not slices and not bad:
            what = "DICOM files" if self.format == "dicom" else ".npy arrays"
            raise DataError(f"{self.root}: no {what} found ({len(self.ignored)} other files, e.g. "
                            f"{', '.join(sorted(self.ignored)[:3])})")
        self.n_series = len(slices)
        records: list[Record] = []
        for series, items in slices.items():
            items.sort(key=lambda t: t[0])
            if not self.volumes:
                records += [Record(key=k, group=series, ref=ref) for _, k, ref in items]
                continue
            if len(items) < self.depth:
                where = items[0][1] if len(items) == 1 else f"{items[0][1]} .. {items[-1][1]}"
                records.append(Record(key=where, group=series, ref=_Bad(DataError(
                    f"{where}: series has {len(items)} slices, fewer than data.ct.volume_depth={self.depth}"))))
                continue
            for start in range(0, len(items) - self.depth + 1, self.depth):
                block = items[start:start + self.depth]
                key = f"{block[0][1]} .. {block[-1][1]}" if len(block) > 1 else block[0][1]
                records.append(Record(key=key, group=series, ref=[ref for _, _, ref in block]))
        records += bad
        return records

    def _scan_dicom(self):
        pydicom = _pydicom()
        from pydicom.errors import InvalidDicomError

        series: dict[str, list] = {}
        bad: list[Record] = []
        for path in self._list(DICOM_SUFFIXES, "DICOM files (.dcm, .dicom, .ima or no extension)"):
            key = self._key(path)
            if path.name.upper() == "DICOMDIR":
                self.ignored.append(key)
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except InvalidDicomError:
                if path.suffix == "":  # README, LICENSE...: not claimed to be DICOM by its name
                    self.ignored.append(key)
                    continue
                bad.append(Record(key, key, _Bad(DataError(
                    f"{key}: not a DICOM file (no DICM preamble); use data.ct.format: npy for arrays"))))
                continue
            except Exception as exc:  # noqa: BLE001
                bad.append(Record(key, key, _Bad(DataError(f"{key}: corrupt or truncated DICOM header ({exc})"))))
                continue
            if self.group_by == "patient" and ds.get("PatientID"):
                sid = f"patient:{ds.PatientID}"
            elif ds.get("SeriesInstanceUID"):
                sid = f"series:{ds.SeriesInstanceUID}"
            else:
                sid = self._folder_group(path)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            pos = self._position(ds)
            for f in range(frames):
                fkey = key if frames == 1 else f"{key}[frame {f}]"
                series.setdefault(sid, []).append(((pos, natural_key(key), f), fkey, ("dicom", path, key, f if frames > 1 else None)))
        return series, bad

    def _folder_group(self, path: Path) -> str:
        parent = path.parent
        return f"dir:{self._key(parent)}" if parent != self.root else f"file:{self._key(path)}"

    @staticmethod
    def _position(ds) -> float:
        try:
            ipp = [float(v) for v in ds.ImagePositionPatient]
            iop = [float(v) for v in ds.ImageOrientationPatient]
            normal = np.cross(iop[:3], iop[3:])
            return float(np.dot(normal, ipp))
        except (AttributeError, TypeError, ValueError, IndexError):
            pass
        for attr in ("SliceLocation", "InstanceNumber"):
            try:
                return float(ds.get(attr))
            except (TypeError, ValueError):
                continue
        return 0.0

    def _scan_npy(self):
        series: dict[str, list] = {}
        bad: list[Record] = []
        for path in self._list({".npy"}, ".npy arrays"):
            key = self._key(path)
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                shape = arr.shape
                del arr
            except Exception as exc:  # noqa: BLE001
                bad.append(Record(key, key, _Bad(DataError(f"{key}: corrupt or truncated .npy file ({exc})"))))
                continue
            if len(shape) == 2:
                sid = self._folder_group(path)
                series.setdefault(sid, []).append((natural_key(key), key, ("npy", path, key, None)))
            elif len(shape) == 3:
                sid = f"file:{key}"
                for s in range(shape[0]):
                    series.setdefault(sid, []).append(((s,), f"{key}[{s}]", ("npy", path, key, s)))
            else:
                bad.append(Record(key, key, _Bad(DataError(
                    f"{key}: .npy array has shape {shape}; expected [H, W] or [slices, H, W]"))))
        return series, bad

    # -- loading ----------------------------------------------------------
    def _cached(self, key: str, loader):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = loader()
        self._cache[key] = value
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return value

    def _read_dicom(self, path: Path, key: str):
        pydicom = _pydicom()
        data = self.read_bytes(path, key)
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{key}: corrupt or truncated DICOM file ({exc})") from None
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            kind = ds.get("Modality") or ds.get("SOPClassUID", "unknown")
            raise DataError(f"{key}: DICOM has no pixel data (no PixelData element; modality {kind})")
        try:
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001
            tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(tsuid, "name", tsuid)
            raise DataError(f"{key}: cannot decode DICOM pixel data (transfer syntax {name}; "
                            f"{type(exc).__name__}: {exc})") from None
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise DataError(f"{key}: DICOM is not a grayscale slice (SamplesPerPixel={ds.SamplesPerPixel})")
        slope = ds.get("RescaleSlope", 1)
        intercept = ds.get("RescaleIntercept", 0)
        slope = 1.0 if slope in (None, "") else float(slope)
        intercept = 0.0 if intercept in (None, "") else float(intercept)
        hu = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        expect = 3 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else 2
        if hu.ndim != expect:
            raise DataError(f"{key}: unexpected DICOM pixel array shape {hu.shape}")
        return hu

    def _read_npy(self, path: Path, key: str):
        data = self.read_bytes(path, key)
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{key}: corrupt or truncated .npy file ({exc})") from None
        if arr.dtype.kind not in "uif" or arr.ndim not in (2, 3):
            raise DataError(f"{key}: .npy array must be numeric [H, W] or [slices, H, W], "
                            f"got {arr.dtype} {arr.shape}")
        return arr.astype(np.float32)

    def _slice(self, ref) -> np.ndarray:
        """One slice as float32 [H, W] in [0, 1]."""
        kind, path, key, index = ref
        if kind == "dicom":
            values = self._cached(key, lambda: self._read_dicom(path, key))
            unit = False
        else:
            values = self._cached(key, lambda: self._read_npy(path, key))
            unit = self.npy_values == "unit"
        x = values if index is None else values[index]
        if not np.isfinite(x).all():
            raise DataError(f"{key}: contains NaN or infinite values")
        if unit:
            return np.clip(x, 0.0, 1.0)
        return np.clip((x - self.lo) / (self.hi - self.lo), 0.0, 1.0)

    def load(self, record: Record) -> np.ndarray:
        if isinstance(record.ref, _Bad):
            raise record.ref.error
        if not self.volumes:
            x = resize_square(self._slice(record.ref)[None], self.image_size)
            return to_channels(x, self.channels, record.key)
        slices = []
        for ref in record.ref:
            s = self._slice(ref)
            if slices and s.shape != slices[0].shape:
                raise DataError(f"{ref[2]}: slice size {s.shape[0]}x{s.shape[1]} differs from the rest of "
                                f"its series ({slices[0].shape[0]}x{slices[0].shape[1]})")
            slices.append(s)
        vol = resize_square(np.stack(slices)[:, None], self.image_size)[:, 0]  # [D, H, W]
        return to_channels(vol[None], self.channels, record.key)

    def manifest_extra(self) -> dict:
        return {"ct": {"format": self.format, "hu_window": [self.lo, self.hi], "n_series": self.n_series,
                       "group_by": self.group_by, "volume_depth": self.depth if self.volumes else None}}
