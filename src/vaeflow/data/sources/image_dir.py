"""``image_dir``: every image under ``data.root`` (recursive).

Formats: jpg/jpeg, png, webp, bmp, tif/tiff (by extension; hidden files skipped).
Images are converted to ``data.channels`` (gray replicated to RGB, RGB to gray
by ITU-R 601 luma; alpha dropped), 16-bit grayscale PNG/TIFF scaled by 1/65535
(not clipped to 255 as PIL's ``convert("L")`` would), then resized so the shorter
side is ``data.image_size`` and center-cropped square. With ``image_size: null``
all images must already share one size.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Record, Source, require_root, resize_square, to_channels, walk_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def decode_image(data: bytes, key: str, channels: int) -> np.ndarray:
    """Encoded image bytes -> float32 [channels, H, W] in [0, 1]; DataError naming ``key`` if bad."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # full decode here: truncated files fail now, not later
                return pil_to_array(im, channels, key)
    except DataError:
        raise
    except UnidentifiedImageError:
        if not data:
            raise DataError(f"{key}: empty file (0 bytes), not an image") from None
        raise DataError(f"{key}: not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DataError(f"{key}: corrupt or truncated image ({exc})") from None


def pil_to_array(im, channels: int, key: str) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float32)
        if arr.ndim != 2:
            raise DataError(f"{key}: unsupported {mode} image layout {arr.shape}")
        x = np.clip(arr / 65535.0, 0.0, 1.0)[None]
    elif mode == "F":
        x = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)[None]
    else:
        if mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha is dropped next
        im = im.convert("RGB" if channels == 3 else "L")
        arr = np.asarray(im, dtype=np.float32) / 255.0
        x = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return to_channels(np.ascontiguousarray(x, dtype=np.float32), channels, key)


def list_images(root: Path, source: Source, what: str) -> list[Path]:
    files = walk_files(root)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    source.ignored = [p.relative_to(root).as_posix() for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if not images:
        if source.ignored:
            raise DataError(
                f"{root}: no images found for {what} ({len(source.ignored)} other files, e.g. "
                f"{', '.join(source.ignored[:3])}); supported extensions: {', '.join(IMAGE_EXTENSIONS)}")
        raise DataError(f"{root}: folder is empty, no images found for {what}")
    return images


class ImageDirSource(Source):
    name = "image_dir"
    default_channels = 3

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.root = require_root(cfg, self.name)

    def records(self) -> list[Record]:
        paths = list_images(self.root, self, "data.dataset: image_dir")
        keys = [p.relative_to(self.root).as_posix() for p in paths]
        return [Record(key=k, group=k, ref=p) for k, p in zip(keys, paths)]

    def load(self, record: Record) -> np.ndarray:
        x = decode_image(self.read_bytes(record.ref, record.key), record.key, self.channels)
        return self.transform(x)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return resize_square(x, self.image_size)
