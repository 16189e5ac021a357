"""Common storages an image can be re-encoded to without changing what it shows (training/invariance.py).

Each storage takes the decoded 8-bit RGB pixels the pipeline trains on, writes them as one kind of file in memory
and decodes that file the way every file is decoded (data/images.py): what changes is only what the storage
adds, its compression artefacts and chroma. Greyscale storage keeps the content only of images whose content is
grey (the probe's `gray_content`), so it is applied to those alone; a lossless format keeps every pixel, so it
is applied where the original file was stored losslessly, as a control (it must not flip a prediction).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.images import DEFAULT_MAX_PIXELS, decode_rgb, load_rgb

JPEG_QUALITY = 90  # a common camera / export default: visible artefacts are rare, the file's statistics change
LOSSLESS_FORMATS = {"PNG", "BMP", "TIFF", "PPM", "GIF"}


@dataclass(frozen=True)
class Storage:
    name: str
    format: str  # PIL format written
    mode: str  # PIL mode written: "L" (greyscale-stored) or "RGB"
    options: tuple = ()  # PIL save options
    max_images: int | None = None  # a control needs few images: at most this many

    @property
    def scope(self) -> str:
        """Which files it applies to, in words."""
        return ("grey-content images" if self.mode == "L" else "files stored losslessly" if self.format == "PNG"
                else "every image")

    def applies(self, record: dict) -> bool:
        """Whether re-encoding keeps this file's content (its probe record: data/images.py)."""
        if self.mode == "L":
            return bool(record.get("gray_content"))
        if self.format == "PNG":
            return record.get("format") in LOSSLESS_FORMATS
        return True

    def encode(self, rgb: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rgb).convert(self.mode).save(buffer, self.format, **dict(self.options))
        return buffer.getvalue()


STORAGES = (
    Storage(f"greyscale JPEG q{JPEG_QUALITY}", "JPEG", "L", (("quality", JPEG_QUALITY),)),
    Storage(f"RGB JPEG q{JPEG_QUALITY} 4:2:0", "JPEG", "RGB", (("quality", JPEG_QUALITY), ("subsampling", 2))),
    Storage("PNG (lossless)", "PNG", "RGB", max_images=64),
)


@dataclass(frozen=True)
class Reencoded:
    """The image loader of data/folder.py `ImageDataset` (its `cache` argument) that serves each file re-encoded
    to `storage`; None serves the files as decoded. Picklable, for DataLoader workers."""
    storage: Storage | None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __call__(self, path: str) -> np.ndarray:
        rgb = load_rgb(path, max_pixels=self.max_pixels)
        return rgb if self.storage is None else decode_rgb(self.storage.encode(rgb), path, self.max_pixels)
