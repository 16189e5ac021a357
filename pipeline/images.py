"""Robust image decoding to 8-bit RGB numpy arrays."""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # we apply our own, configurable guard below


class ImageDecodeError(Exception):
    """A file that cannot be used as an image; the message names the file and the reason."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: stretch its max to 255
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() or 1.0
        return Image.fromarray(np.rint(arr * (255.0 / hi)).clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):  # composite transparent pixels on white
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")  # L, P, CMYK, YCbCr, F, 1


def load_rgb(path: str, max_pixels: int = 89_478_485, draft_size: int | None = None) -> np.ndarray:
    """Decode `path` to an HxWx3 uint8 array (EXIF orientation applied, first frame of animations).

    `draft_size` lets JPEG decode at reduced scale (fast integrity probe).
    Raises ImageDecodeError for anything unreadable.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF/ICC chatter on odd files
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageDecodeError(f"{path}: {w}x{h} exceeds dataset.max_pixels={max_pixels} "
                                           "(possible decompression bomb; raise the limit if intended)")
                if draft_size and im.format == "JPEG":
                    im.draft("RGB", (draft_size, draft_size))
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = np.asarray(_to_rgb(im))
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{path}: {type(e).__name__}: {e}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ImageDecodeError(f"{path}: decoded to unexpected shape {rgb.shape}")
    return rgb
