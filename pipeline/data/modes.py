"""PIL image modes to 8-bit RGB (data/images.py decodes through `to_rgb`): 16/32-bit and float grey are stretched
to their maximum without a full-size float copy, transparent pixels are composited on white."""
from __future__ import annotations

import numpy as np
from PIL import Image

_STRETCH_ROWS_PIXELS = 1 << 20  # float32 rows scaled at a time: a 4 MiB temporary whatever the image size


def stretch_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16/32-bit or float grey -> uint8, the maximum stretched to 255 (negative values and NaN become 0). 16-bit
    goes through a 64 K lookup table, wider types through float32 a block of rows at a time: the only full-size
    array besides the input is the uint8 output."""
    hi = float(np.nanmax(arr)) if arr.size else 0.0
    scale = 255.0 / hi if 0 < hi < np.inf else 255.0
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        return np.rint(np.arange(2 ** (8 * arr.dtype.itemsize)) * scale).clip(0, 255).astype(np.uint8)[arr]
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, _STRETCH_ROWS_PIXELS // max(1, arr.shape[-1]))
    for top in range(0, arr.shape[0], rows):
        block = arr[top:top + rows].astype(np.float32)
        block *= scale
        np.nan_to_num(np.rint(block, out=block).clip(0, 255, out=block), copy=False, nan=0.0)
        out[top:top + rows] = block
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: deep grey stretched (`stretch_to_uint8`), transparency composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16/32-bit or float grey: stretch max to 255
        return Image.fromarray(stretch_to_uint8(np.asarray(im))).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # composite transparent pixels on white
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")  # L, P, CMYK, YCbCr, LAB, 1
