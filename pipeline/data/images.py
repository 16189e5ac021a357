"""Robust image decoding to 8-bit RGB numpy arrays, a header+hash probe, and timm-exact resizing.

Decoding: PIL reads the header (format, mode, size). Plain 8-bit JPEG/PNG/BMP/WebP (mode RGB or L) then decode with
OpenCV (libjpeg-turbo with SIMD; 1.5-2x PIL on the shared datasets, see bench/bench_data.py), which applies EXIF
orientation itself. Everything else (palette, alpha, CMYK, 16-bit, TIFF, GIF, ...) and any file OpenCV refuses goes
through PIL. A file that does not decode raises ImageDecodeError with a plain reason ("0-byte file", "truncated
image file", ...: `plain_reason`).

Bounds: a file's size is checked (stat) before it is read, its header (dataset.max_pixels, aspect ratio) before a
pixel is decoded, a resize's target before it allocates; a file over one is unusable (ImageDecodeError: a skip the
run report lists). PIL's process-wide `Image.MAX_IMAGE_PIXELS` is left as the application set it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import struct
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from pipeline.data.modes import to_rgb

_logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (dataset.max_pixels in conf/dataset/_base.yaml)
# What one file may cost, checked before the cost is paid (module docstring). Generous: no photo, scan or X-ray
# comes near them; a file over one is skipped with the reason.
MAX_FILE_BYTES = 512 * 2**20  # stat() before reading: an uncompressed 8-bit RGB image at DEFAULT_MAX_PIXELS is 256 MiB
MAX_ASPECT = 50  # long side / short side: a 60000x1 strip passes max_pixels, its short side resized to 256 is 15M long
MAX_RESIZED_PIXELS = 50_000_000  # pixels one resize may produce (150 MB as 8-bit RGB)
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


def open_image(source) -> Image.Image:
    """`Image.open` (reads the header only) without PIL's size limit, which stays as the application set it:
    callers apply their own (`size_problem`, `dataset.max_pixels`). An image PIL refuses for its size is opened
    by its format's plugin directly, so the config, not PIL's fixed limit, decides."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(source)
        except Image.DecompressionBombError:
            return _open_past_pil_limit(source)


def _open_past_pil_limit(source) -> Image.Image:
    """`Image.open`'s format detection without its size check (the caller checks the size)."""
    is_path = isinstance(source, (str, os.PathLike))
    with open(source, "rb") if is_path else contextlib.nullcontext(source) as f:
        f.seek(0)
        prefix = f.read(16)
    Image.init()
    for factory, accept in (Image.OPEN[fmt] for fmt in Image.ID):
        accepted = accept(prefix) if accept else True
        if not accepted or isinstance(accepted, str):
            continue
        if not is_path:
            source.seek(0)
        try:
            return factory(source)  # a path: the plugin opens (and closes) the file itself
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    raise UnidentifiedImageError("cannot identify image file")


def size_problem(width: int, height: int, max_pixels: int) -> str | None:
    """Why an image of this size is not decoded (pixel count, aspect ratio), in plain words; None if it may be."""
    if width * height > max_pixels:
        return (f"{width}x{height} exceeds dataset.max_pixels={max_pixels} "
                "(possible decompression bomb; raise the limit if intended)")
    return aspect_problem(width, height)


def aspect_problem(width: int, height: int) -> str | None:
    """Why an image this elongated is not used (its resized copy would be huge), None if it may be."""
    long, short = max(width, height), max(1, min(width, height))
    if long > MAX_ASPECT * short:
        return (f"{width}x{height} is a strip, not a picture: aspect ratio {long // short}:1 is over the "
                f"{MAX_ASPECT}:1 an image may have (images.MAX_ASPECT)")
    return None


def _open_checked(data: bytes, path: str, max_pixels: int) -> Image.Image:
    im = open_image(io.BytesIO(data))
    problem = size_problem(*im.size, max_pixels)
    if problem:
        im.close()
        raise unusable(path, problem)
    return im


def _decode_pil(im: Image.Image, draft_size: int | None) -> np.ndarray:
    if draft_size and im.format == "JPEG":
        im.draft("RGB", (draft_size, draft_size))
    im.load()
    im = ImageOps.exif_transpose(im)
    return np.asarray(to_rgb(im))


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


def read_bytes(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The file's bytes; a file over `max_bytes` is unusable, its size checked (stat) before a byte is read, and
    the read takes no more than stat's size (+1 byte, to notice a file that is still growing)."""
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise unusable(path, f"file is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB an image "
                                 "file may have (images.MAX_FILE_BYTES); not read")
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except OSError as e:
        raise unusable(path, f"cannot read file: {e.strerror or e}") from None
    if len(data) > size:
        raise unusable(path, "file grew while being read (still being written?)")
    return data


def check_header(data: bytes, path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header of encoded `data`, checked as decode_rgb checks it (no pixel decoded).
    Raises ImageDecodeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _open_checked(data, path, max_pixels) as im:
                return im.size
    except _DECODE_ERRORS as e:
        raise unusable(path, plain_reason(data, e)) from None


def load_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> np.ndarray:
    """Decode `path` to an HxWx3 uint8 array (EXIF orientation applied, first frame of animations).

    `draft_size` lets JPEG decode at reduced scale (fast integrity probe).
    Raises ImageDecodeError for anything unreadable.
    """
    return decode_rgb(read_bytes(path), path, max_pixels, draft_size)


def check_decodable_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int = 64) -> dict:
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


def resize_target(height: int, width: int, short_side: int) -> tuple[int, int]:
    """`resized_shape`, checked before anything is allocated: a strip (over MAX_ASPECT) or a result over
    MAX_RESIZED_PIXELS raises ImageDecodeError (a skip at run time) instead of filling the memory."""
    problem = aspect_problem(width, height)
    new_h, new_w = resized_shape(height, width, short_side)
    if not problem and new_h * new_w > MAX_RESIZED_PIXELS:
        problem = (f"{width}x{height} resized to short side {short_side} would be {new_w}x{new_h}, over "
                   f"images.MAX_RESIZED_PIXELS={MAX_RESIZED_PIXELS}")
    if problem:
        raise ImageDecodeError(f"image: {problem}", problem)
    return new_h, new_w


def resize_short_side(img: np.ndarray, short_side: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize so the short side is `short_side`, exactly as timm's eval transform does (PIL, antialiased).
    Raises ImageDecodeError for a target it will not allocate (`resize_target`)."""
    h, w = img.shape[:2]
    new_h, new_w = resize_target(h, w, short_side)
    if (new_h, new_w) == (h, w):
        return img
    resample = PIL_RESAMPLE.get(interpolation, Image.BILINEAR)
    return np.asarray(Image.fromarray(img).resize((new_w, new_h), resample))
