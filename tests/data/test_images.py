"""Robust decoding: every odd file type becomes the right RGB array or a reported error; EXIF; probe; the bounds
(file size, pixels, aspect ratio, resize target) and PIL's own limit left alone."""
from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.data import images
from pipeline.data.augment import build_eval_transform
from pipeline.data.images import (
    DEFAULT_MAX_PIXELS,
    MAX_ASPECT,
    MAX_FILE_BYTES,
    MAX_RESIZED_PIXELS,
    ImageDecodeError,
    check_decodable_image,
    decode_rgb,
    load_rgb,
    open_image,
    plain_reason,
    resize_short_side,
    resized_shape,
)

PREP = {"input_size": [3, 96, 96], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875}


def _exif_jpeg(arr: np.ndarray, orientation: int, mode: str = "RGB") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


def _save(tmp_path, name: str, im: Image.Image, **kw) -> str:
    path = tmp_path / name
    im.save(path, **kw)
    return str(path)


def _odd_files(tmp_path) -> dict[str, tuple[str, tuple[int, int, int]]]:
    """name -> (path, expected RGB of pixel (0, 0))."""
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent -> white after compositing
    half = rgba.copy()
    half[..., 3] = 128  # red at 50% alpha over white -> (255, 127, 127)
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 1
    g16 = Image.fromarray((np.arange(36).reshape(6, 6) * 1000).astype(np.uint16))
    frames = [Image.new("P", (6, 6), i) for i in (2, 3)]
    for f in frames:
        f.putpalette([0] * 6 + [90, 90, 90, 250, 0, 0] + [0] * 756)
    anim = str(tmp_path / "anim.gif")
    frames[0].save(anim, save_all=True, append_images=frames[1:])
    return {
        "gray_png": (_save(tmp_path, "g.png", Image.new("L", (6, 6), 77)), (77, 77, 77)),
        "gray_jpeg": (_save(tmp_path, "g.jpg", Image.new("L", (8, 8), 77), quality=100), (77, 77, 77)),
        "rgba_transparent": (_save(tmp_path, "t.png", Image.fromarray(rgba, "RGBA")), (255, 255, 255)),
        "rgba_half": (_save(tmp_path, "h.png", Image.fromarray(half, "RGBA")), (255, 127, 127)),
        "la": (_save(tmp_path, "la.png", Image.new("LA", (6, 6), (0, 0))), (255, 255, 255)),
        "palette": (_save(tmp_path, "p.png", pal), (10, 200, 30)),
        "palette_transparent": (_save(tmp_path, "pt.png", pal_t, transparency=1), (255, 255, 255)),
        "cmyk_jpeg": (_save(tmp_path, "c.jpg", Image.new("CMYK", (8, 8), (0, 255, 0, 0)), quality=100), (255, 0, 255)),
        "gray16_png": (_save(tmp_path, "g16.png", g16), (0, 0, 0)),
        "bilevel": (_save(tmp_path, "b.png", Image.new("1", (6, 6), 1)), (255, 255, 255)),
        "tiff": (_save(tmp_path, "x.tif", Image.new("RGB", (6, 6), (1, 2, 3))), (1, 2, 3)),
        "webp_lossless": (_save(tmp_path, "x.webp", Image.new("RGB", (6, 6), (9, 80, 200)), lossless=True),
                          (9, 80, 200)),
        "bmp": (_save(tmp_path, "x.bmp", Image.new("RGB", (6, 6), (4, 5, 6))), (4, 5, 6)),
        "gif_first_frame": (anim, (90, 90, 90)),
    }


def test_each_odd_file_type_comes_out_as_rgb(tmp_path):
    for name, (path, expected) in _odd_files(tmp_path).items():
        rgb = load_rgb(path)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, name
        assert np.abs(rgb[0, 0].astype(int) - expected).max() <= 2, (name, rgb[0, 0], expected)
    g16 = load_rgb(str(tmp_path / "g16.png"))
    assert g16.max() == 255 and g16[0, 1, 0] == round(1000 * 255 / 35000)  # 16-bit stretched to its max


def test_unusable_files_raise_a_reason_naming_the_file(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, "JPEG")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(png, "PNG")
    bad = {"empty.jpg": (b"", "0-byte file"),
           "html.jpg": (b"<!DOCTYPE html><html><body>404</body></html>", "text/HTML, not an image"),
           "trunc.jpg": (good.getvalue()[:300], "truncated image file"),
           "half.jpg": (good.getvalue()[:len(good.getvalue()) // 2], "truncated image file"),
           "header.jpg": (good.getvalue()[:20], "truncated image file"),
           "trunc.png": (png.getvalue()[:60], "truncated image file"),
           "text.png": (b"just text", "text/HTML, not an image"),
           "zip.jpg": (b"PK\x03\x04" + bytes(60), "not an image (unknown format)")}
    for name, (content, reason) in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageDecodeError, match=name.replace(".", r"\.")) as e:
            load_rgb(str(tmp_path / name))
        assert e.value.reason == reason == check_decodable_image(str(tmp_path / name))["error"], name
    with pytest.raises(ImageDecodeError, match="cannot read file"):
        load_rgb(str(tmp_path / "missing.jpg"))
    (tmp_path / "big.png").write_bytes(png.getvalue())
    with pytest.raises(ImageDecodeError, match="exceeds dataset.max_pixels=4000"):
        load_rgb(str(tmp_path / "big.png"), max_pixels=4000)


def test_a_decoder_message_is_kept_without_memory_addresses():
    error = OSError("cannot decode <_io.BytesIO object at 0x7f3a2b1c0d90>, buffer 0x7f3a2b1c0d90")
    reason = plain_reason(b"\x89PNG\r\n\x1a\n" + bytes(16), error)
    assert reason.startswith("damaged PNG file (cannot decode") and "0x" not in reason and "object" not in reason


@pytest.mark.parametrize("orientation,mode", [(6, "RGB"), (8, "RGB"), (3, "RGB"), (6, "L")])
def test_exif_orientation_is_applied(orientation, mode):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 250  # bright left half of a landscape image
    data = _exif_jpeg(arr, orientation, mode)
    rgb = decode_rgb(data)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert rgb.shape == expected.shape == ((40, 20, 3) if orientation in (6, 8) else (20, 40, 3))
    assert np.array_equal(rgb, expected)
    bright = rgb.mean(axis=2) > 128
    if orientation == 6:  # rotated 90 degrees clockwise: the left half becomes the top half
        assert bright[:20].all() and not bright[20:].any()


def test_fast_decoder_gives_the_same_pixels_as_pil():
    from sklearn.datasets import load_sample_image

    buf = io.BytesIO()
    Image.fromarray(load_sample_image("flower.jpg")).save(buf, "JPEG", quality=90)
    assert np.array_equal(decode_rgb(buf.getvalue()), np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))


def test_probe_records_hash_header_and_odd_facts(tmp_path):
    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "png_named.jpg", format="PNG")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).convert("RGB").save(tmp_path / "grey.png")
    mismatched = check_decodable_image(str(tmp_path / "png_named.jpg"))
    assert mismatched["format"] == "PNG" and mismatched["ext_ok"] is False and mismatched["colors"] == 1
    a, b = check_decodable_image(str(tmp_path / "a.png")), check_decodable_image(str(tmp_path / "b.png"))
    assert a["sha1"] == b["sha1"] and (a["width"], a["height"]) == (48, 32) and a["ext_ok"] is True
    assert a["gray_content"] is False and a["colors"] > 1000
    assert check_decodable_image(str(tmp_path / "grey.png"))["gray_content"] is True
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    bad = check_decodable_image(str(tmp_path / "bad.jpg"))
    assert bad["error"] == "text/HTML, not an image" and bad["sha1"]  # the path is the record's key, not its reason


def test_resize_short_side_follows_torchvision_rule():
    img = np.zeros((427, 640, 3), np.uint8)
    assert resized_shape(427, 640, 256) == (256, 383)  # int(256 * 640 / 427) = 383, not round() = 384
    assert resize_short_side(img, 256).shape == (256, 383, 3)
    assert resize_short_side(img.transpose(1, 0, 2), 256).shape == (383, 256, 3)
    assert resize_short_side(img, 427) is img  # already the right size: untouched


PIL_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)  # Image.MAX_IMAGE_PIXELS as PIL ships it


def _strip_png(path, width: int = 60000, height: int = 1) -> str:
    Image.new("L", (width, height), 200).save(path)
    return str(path)


def test_a_strip_under_max_pixels_is_refused_at_its_header(tmp_path):
    path = _strip_png(tmp_path / "strip.png")
    assert (tmp_path / "strip.png").stat().st_size < 1000 and 60000 < DEFAULT_MAX_PIXELS  # small, under the limit
    with pytest.raises(ImageDecodeError, match=r"strip\.png: 60000x1 is a strip") as e:
        load_rgb(path)
    assert f"over the {MAX_ASPECT}:1" in e.value.reason
    record = check_decodable_image(path)
    assert (record["width"], record["height"]) == (60000, 1) and record["error"] == e.value.reason
    assert load_rgb(_strip_png(tmp_path / "wide.png", 50 * 8, 8)).shape == (8, 400, 3)  # 50:1 is still a picture


def test_a_resize_is_checked_before_it_allocates():
    with pytest.raises(ImageDecodeError, match="is a strip"):  # 256 x 15.36M px if it went ahead
        resize_short_side(np.zeros((1, 60000, 3), np.uint8), 256)
    with pytest.raises(ImageDecodeError, match="is a strip"):
        build_eval_transform(PREP)(image=np.zeros((60000, 1, 3), np.uint8))
    assert resized_shape(10, 500, 1100)[0] * resized_shape(10, 500, 1100)[1] > MAX_RESIZED_PIXELS
    with pytest.raises(ImageDecodeError, match="would be 55000x1100, over images.MAX_RESIZED_PIXELS"):
        resize_short_side(np.zeros((10, 500, 3), np.uint8), 1100)  # 50:1 passes; 60.5M output pixels do not
    assert resize_short_side(np.zeros((10, 500, 3), np.uint8), 20).shape == (20, 1000, 3)


def test_a_file_over_the_size_cap_is_skipped_without_being_read(tmp_path, monkeypatch):
    big = tmp_path / "huge.png"
    with open(big, "wb") as f:  # a sparse file: a PNG signature, then MAX_FILE_BYTES of nothing
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(MAX_FILE_BYTES + 1)
    opened = []
    monkeypatch.setattr(images, "open", lambda *a, **k: opened.append(a) or pytest.fail("file was opened"),
                        raising=False)
    with pytest.raises(ImageDecodeError, match=r"huge\.png: file is 512 MiB, over the 512 MiB .* not read"):
        load_rgb(str(big))
    assert "MAX_FILE_BYTES" in check_decodable_image(str(big))["error"] and not opened


def test_16_bit_and_float_grey_are_stretched_without_a_float64_copy(tmp_path):
    rng = np.random.default_rng(0)
    g16 = rng.integers(0, 40000, (1000, 1000), dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    load_rgb(str(tmp_path / "g16.png"))  # first call: imports and caches out of the measurement
    tracemalloc.start()
    rgb = load_rgb(str(tmp_path / "g16.png"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(rgb[..., 0], np.rint(g16 * (255.0 / g16.max())).astype(np.uint8))
    assert peak < 16 * g16.size, peak  # ~8.5 B/px (bytes, uint16, uint8, RGB); float64 temporaries made it 26.5
    i32 = rng.integers(-5, 2**30, (30, 40), dtype=np.int32)  # 32-bit grey: negative values become 0
    f32 = (rng.random((30, 40)) * 1000).astype(np.float32)
    f32[0, 0] = np.nan  # float grey: NaN becomes 0
    Image.fromarray(i32, "I").save(tmp_path / "i.tif")
    Image.fromarray(f32, "F").save(tmp_path / "f.tif")
    for name, arr in (("i.tif", i32), ("f.tif", f32)):
        out = load_rgb(str(tmp_path / name))[..., 0].astype(int)
        want = np.rint(np.nan_to_num(arr.astype(np.float64).clip(0), nan=0) * 255 / np.nanmax(arr)).astype(int)
        assert np.abs(out - want).max() <= 1, name
    assert load_rgb(str(tmp_path / "f.tif"))[0, 0, 0] == 0
    with pytest.raises(ImageDecodeError, match="exceeds dataset.max_pixels=4000"):  # checked before converting
        load_rgb(str(tmp_path / "g16.png"), max_pixels=4000)


def test_pil_global_limit_is_left_alone_and_max_pixels_decides(tmp_path, monkeypatch):
    import pipeline  # noqa: F401

    Image.new("RGB", (100, 100), (1, 2, 3)).save(tmp_path / "a.png")
    load_rgb(str(tmp_path / "a.png"))
    check_decodable_image(str(tmp_path / "a.png"))
    open_image(str(tmp_path / "a.png")).close()
    assert Image.MAX_IMAGE_PIXELS == PIL_DEFAULT_LIMIT
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # an application's own, stricter limit ...
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "a.png")  # ... still guards its own Image.open calls
    assert load_rgb(str(tmp_path / "a.png"))[0, 0].tolist() == [1, 2, 3]  # dataset.max_pixels decides here
    assert check_decodable_image(str(tmp_path / "a.png"))["width"] == 100
    with pytest.raises(ImageDecodeError, match="exceeds dataset.max_pixels=9999"):
        load_rgb(str(tmp_path / "a.png"), max_pixels=9999)
    assert Image.MAX_IMAGE_PIXELS == 1000
