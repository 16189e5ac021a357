"""Robust image decoding to 8-bit RGB numpy arrays, a header+hash probe, and timm-exact resizing.

Decoding: PIL reads the header (format, mode, size: bomb guard before any pixel is
decoded). Plain 8-bit JPEG/PNG/BMP/WebP (mode RGB or L) then decode with OpenCV
(libjpeg-turbo with SIMD; 1.5-2x PIL on the shared datasets, see bench/bench_data.py),
which applies EXIF orientation itself. Everything else (palette, alpha, CMYK, 16-bit,
TIFF, GIF, ...) and any file OpenCV refuses goes through PIL. A file that does not decode raises
ImageDecodeError with a plain reason ("0-byte file", "truncated image file", ...: `plain_reason`).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

_logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (dataset.max_pixels in conf/dataset/_base.yaml)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FAST_FORMATS = {"JPEG", "PNG", "BMP", "WEBP"}  # OpenCV decodes these to the same pixels as PIL
FAST_MODES = {"RGB", "L"}
EXTENSIONS_BY_FORMAT = {"JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"}, "PNG": {".png"}, "GIF": {".gif"},
                        "BMP": {".bmp"}, "TIFF": {".tif", ".tiff"}, "WEBP": {".webp"}, "PPM": {".ppm", ".pgm"},
                        "MPO": {".jpg", ".jpeg"}}
PIL_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING, "area": Image.BOX}
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                  EOFError, IndexError, KeyError, TypeError)


class ImageDecodeError(Exception):
    """A file that cannot be used as an image; the message names the file and the reason, `reason` is the reason
    alone, in plain words (what the run report lists beside the path)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def unusable(path: str, reason: str) -> ImageDecodeError:
    return ImageDecodeError(f"{path}: {reason}", reason)


_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF",
               b"MM\x00*": "TIFF", b"RIFF": "WebP"}  # first bytes of the formats people store photos in
_TEXT_BYTES = set(range(32, 256)) | {9, 10, 13}


def plain_reason(data: bytes, error: BaseException) -> str:
    """Why `data` did not decode, in plain words (a decoder's message never carries an object repr or address)."""
    if not data:
        return "0-byte file"
    fmt = next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)
    message = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>|\s*\b0x[0-9a-fA-F]{6,}\b", "", str(error)).strip()
    truncated = "truncat" in message.lower() or isinstance(error, EOFError)
    if truncated or (fmt and isinstance(error, UnidentifiedImageError)):  # a known header, then too few bytes
        return "truncated image file"
    if not fmt and set(data[:512]) <= _TEXT_BYTES:
        return "text/HTML, not an image"
    if isinstance(error, UnidentifiedImageError):
        return "not an image (unknown format)"
    return f"damaged {fmt or 'image'} file ({message or type(error).__name__})"


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16/32-bit or float grey: stretch max to 255
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        return Image.fromarray(np.rint(arr * (255.0 / hi)).clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # composite transparent pixels on white
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")  # L, P, CMYK, YCbCr, LAB, 1


def open_image(source) -> Image.Image:
    """`Image.open` under our own size guard (`dataset.max_pixels`), not PIL's fixed one, which would refuse
    images the config allows. PIL's limit is lifted here, on first use, so importing the package changes nothing."""
    Image.MAX_IMAGE_PIXELS = None
    return Image.open(source)


def _open_checked(data: bytes, path: str, max_pixels: int) -> Image.Image:
    im = open_image(io.BytesIO(data))
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise unusable(path, f"{w}x{h} exceeds dataset.max_pixels={max_pixels} "
                             "(possible decompression bomb; raise the limit if intended)")
    return im


def _decode_pil(im: Image.Image, draft_size: int | None) -> np.ndarray:
    if draft_size and im.format == "JPEG":
        im.draft("RGB", (draft_size, draft_size))
    im.load()
    im = ImageOps.exif_transpose(im)
    return np.asarray(_to_rgb(im))


def decode_rgb(data: bytes, path: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_size: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to HxWx3 uint8 RGB (see module docstring). Raises ImageDecodeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF/ICC chatter on odd files
            with _open_checked(data, path, max_pixels) as im:
                rgb = None
                if not draft_size and im.format in FAST_FORMATS and im.mode in FAST_MODES:
                    rgb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
                if rgb is None:  # odd mode, or OpenCV refused the file: PIL decodes or names the reason
                    rgb = _decode_pil(im, draft_size)
    except ImageDecodeError:
        raise
    except (*_DECODE_ERRORS, cv2.error) as e:
        raise unusable(path, plain_reason(data, e)) from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise unusable(path, f"decoded to unexpected shape {rgb.shape}")
    return rgb


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise unusable(path, f"cannot read file: {e.strerror or e}") from None


def load_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> np.ndarray:
    """Decode `path` to an HxWx3 uint8 array (EXIF orientation applied, first frame of animations).

    `draft_size` lets JPEG decode at reduced scale (fast integrity probe).
    Raises ImageDecodeError for anything unreadable.
    """
    return decode_rgb(read_bytes(path), path, max_pixels, draft_size)


def probe_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int = 64) -> dict:
    """Read one file once: content hash, header facts and a fast (draft) decode as integrity check.

    Returns {"sha1", "bytes", "format", "mode", "width", "height", "ext_ok", "gray_content", "colors", "phash",
    "exif", "subsampling", "quality"} (colors: distinct colours in a 64 px sample, a placeholder or icon has few;
    the last four: `perceptual_hash`, `storage_facts`) or, for a
    file that is not a usable image, {"sha1", "bytes", "error"}. Never raises for a bad image.
    """
    try:
        data = read_bytes(path)
    except ImageDecodeError as e:
        return {"sha1": None, "bytes": 0, "error": e.reason}
    record: dict = {"sha1": hashlib.sha1(data).hexdigest(), "bytes": len(data)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image(io.BytesIO(data)) as im:
                record.update(format=im.format, mode=im.mode, width=im.size[0], height=im.size[1])
                record.update(storage_facts(im))
        small = decode_rgb(data, path, max_pixels, draft_size)
    except ImageDecodeError as e:
        return {**record, "error": e.reason}
    except _DECODE_ERRORS as e:
        return {**record, "error": plain_reason(data, e)}
    ext = os.path.splitext(path)[1].lower()
    record["ext_ok"] = ext in EXTENSIONS_BY_FORMAT.get(record["format"], {ext})
    step = max(1, max(small.shape[:2]) // 64)  # facts from a <=64 px sample of the draft decode
    sample = small[::step, ::step].reshape(-1, 3).astype(np.int32)
    record["gray_content"] = bool((sample.max(axis=1) - sample.min(axis=1)).max() <= 8)  # JPEG chroma noise
    record["colors"] = int(len(np.unique(sample[:, 0] << 16 | sample[:, 1] << 8 | sample[:, 2])))
    record["phash"] = perceptual_hash(small)
    return record


IJG_LUMA_SUM = 3688  # sum of libjpeg's standard luminance table; libjpeg scales it linearly with quality
SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}  # PIL's get_sampling codes; -1: one channel (grey) or CMYK


def storage_facts(im: Image.Image) -> dict:
    """How a file is stored beyond format/mode/size (data/shortcuts.py): EXIF present, JPEG chroma subsampling
    and a quality estimate from the luminance quantisation table on libjpeg's 1-100 scale (None if not JPEG)."""
    facts = {"exif": bool(im.info.get("exif")), "subsampling": None, "quality": None}
    if im.format == "JPEG" and getattr(im, "quantization", None):
        scale = 100 * sum(im.quantization[0]) / IJG_LUMA_SUM
        facts["quality"] = int(round(min(100.0, (200 - scale) / 2 if scale <= 100 else 5000 / scale)))
        facts["subsampling"] = SUBSAMPLING.get(JpegImagePlugin.get_sampling(im), "none")
    return facts


PHASH_SIDE = 16  # 16x16 = 256-bit hash: 64 bits cannot tell chest X-rays apart (1890 pairs within 6 bits)


def perceptual_hash(rgb: np.ndarray) -> str:
    """256-bit DCT perceptual hash (imagehash.phash) as 64 hex digits: a resized or re-encoded copy differs in
    a few bits (data/near_duplicates.py). Computed on the probe's draft decode, so it costs no extra read."""
    import imagehash  # on first use: it imports scipy

    return str(imagehash.phash(Image.fromarray(rgb), hash_size=PHASH_SIDE))


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """torchvision's Resize(int) rule: the short side becomes `short_side`, the long side int(scaled)."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def resize_short_side(img: np.ndarray, short_side: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize so the short side is `short_side`, exactly as timm's eval transform does (PIL, antialiased)."""
    h, w = img.shape[:2]
    new_h, new_w = resized_shape(h, w, short_side)
    if (new_h, new_w) == (h, w):
        return img
    resample = PIL_RESAMPLE.get(interpolation, Image.BILINEAR)
    return np.asarray(Image.fromarray(img).resize((new_w, new_h), resample))
