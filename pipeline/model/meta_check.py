"""Validation of a model JSON (model.json of an export, best.json of a run) before anything is allocated from it.

`read_json_bounded` refuses a file over `MAX_JSON_BYTES` before reading it and turns every parse failure into a
one-line `ModelFileError`. `check_meta` checks the type and range of every field that inference uses: arch,
num_classes (<= `MAX_CLASSES`), class_names, preprocessing (input_size: 3 positive ints, channels 1 or 3, H and W
<= `MAX_SIDE`; mean/std: 3 finite numbers, std > 0; interpolation and crop_mode among the known names; crop_pct
with the eval resize floor(size / crop_pct) <= `MAX_RESIZE`), feature_levels, tta, temperature and ensemble (2 to
`ensemble.MAX_MEMBERS` members, each with a positive temperature and its own feature_levels), and that
every file name the JSON holds (`files` keys, `onnx.file`, `torchscript.file`) is a plain name (no dir part, no
`..`, not absolute). Where those names resolve to (symlinks) is checked by the loader, which knows the dir.
The bounds: timm's pretrained configs go up to 1024 px and crop_pct 1.15.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from pipeline.errors import ModelFileError
from pipeline.model import ensemble
from pipeline.model.calibrated import VIEWS
from pipeline.model.multidepth import HEAD

MAX_JSON_BYTES = 16 << 20
MAX_CLASSES = 100_000
MAX_SIDE = 4096  # input H and W
MAX_RESIZE = 2 * MAX_SIDE  # the short side before the eval center crop
MAX_LEVELS = 64
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming", "area")  # = images.PIL_RESAMPLE
CROP_MODES = ("center", "squash", "border")
FIX = "re-export the model with `make export RUN=<run dir>`"
RUN_FIX = "re-run training (a run dir's best.json is written by the run itself)"


def fix_for(source: str | Path) -> str:
    """The advice for a bad JSON: a run's best.json comes from training, a model.json from an export."""
    return RUN_FIX if Path(str(source)).name.startswith("best") else FIX
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def show(value: Any, limit: int = 60) -> str:
    """repr of `value`, cut to `limit` characters (a hostile value may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def invalid(source: str, field: str, value: Any, expected: str) -> ModelFileError:
    """The one-line error for a bad field: names the file, the field, the value, what it must be and the fix."""
    return ModelFileError(f"{source}: {field}={show(value)} is not valid ({expected}); {fix_for(source)}")


def read_json_bounded(path: Path) -> Any:
    """The parsed JSON of `path`, read only when it is at most `MAX_JSON_BYTES`; one-line error otherwise."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size  # read no more than the file holds (a read(n) reserves n bytes)
        data = f.read(min(size, MAX_JSON_BYTES) + 1)  # and never more than the cap, even if the file grows
    if len(data) > MAX_JSON_BYTES:
        raise ModelFileError(f"{path} is over {MAX_JSON_BYTES >> 20} MiB, far more than a model JSON holds "
                             f"(a few KB): not a model file; {fix_for(path)}")
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an int of 10^5 digits, nesting
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ModelFileError(f"{path} is not valid JSON ({reason}); {fix_for(path)}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_meta(meta: dict, source: str) -> None:
    """Every field inference reads, checked (see the module doc); `meta` has the required keys already."""
    check_model_fields(meta, source)
    check_preprocessing(meta["preprocessing"], source)
    check_inference_fields(meta, source)
    check_file_names(meta, source)


def check_model_fields(meta: dict, source: str) -> None:
    """arch (a name), num_classes (1..MAX_CLASSES), class_names (that many strings), feature_levels."""
    arch, n, names = meta["arch"], meta["num_classes"], meta["class_names"]
    if not isinstance(arch, str) or not 0 < len(arch) <= 200:
        raise invalid(source, "arch", arch, "a timm model name")
    if not _is_int(n) or not 1 <= n <= MAX_CLASSES:
        raise invalid(source, "num_classes", n, f"an int from 1 to {MAX_CLASSES}")
    if not isinstance(names, list) or len(names) != n:
        raise ModelFileError(f"{source}: num_classes={n} but {len(names) if isinstance(names, list) else '?'} "
                             f"class_names; the two must agree: {fix_for(source)}")
    bad = next((x for x in names if not isinstance(x, str) or len(x) > 1000), None)
    if bad is not None:
        raise invalid(source, "class_names", bad, "every class name a string")
    check_levels(meta.get("feature_levels"), source, "feature_levels")
    check_ensemble(meta.get(ensemble.KEY), source)


def check_levels(levels: Any, source: str, field: str) -> None:
    if levels is not None and (not isinstance(levels, list) or len(levels) > MAX_LEVELS or not all(
            v == HEAD or (_is_int(v) and 0 <= v < MAX_LEVELS) for v in levels)):
        raise invalid(source, field, levels, f"a list of feature level numbers and/or '{HEAD}'")


def check_ensemble(spec: Any, source: str) -> None:
    """`ensemble` (model/ensemble.py): absent, or {"members": [{"temperature": T, "feature_levels": ...}, ...]}."""
    if spec is None:
        return
    members = spec.get("members") if isinstance(spec, dict) else None
    if not isinstance(members, list) or not 2 <= len(members) <= ensemble.MAX_MEMBERS \
            or not all(isinstance(m, dict) for m in members):
        raise invalid(source, "ensemble.members", members, f"a list of 2 to {ensemble.MAX_MEMBERS} objects")
    for i, member in enumerate(members):
        t = member.get("temperature")
        if not _is_number(t) or t <= 0:
            raise invalid(source, f"ensemble.members[{i}].temperature", t, "a positive finite number")
        check_levels(member.get("feature_levels"), source, f"ensemble.members[{i}].feature_levels")


def check_preprocessing(p: Any, source: str) -> None:
    """input_size, mean, std, interpolation, crop_pct, crop_mode, grayscale_input (see the module doc)."""
    if not isinstance(p, dict):
        raise invalid(source, "preprocessing", p, "an object with input_size, mean, std, interpolation, crop_pct")
    size = p["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and all(_is_int(v) for v in size) and size[0] in (1, 3)
            and all(1 <= v <= MAX_SIDE for v in size[1:])):
        raise invalid(source, "preprocessing.input_size", size,
                      f"[channels, height, width]: channels 1 or 3, height and width 1..{MAX_SIDE}")
    for key in ("mean", "std"):
        v = p[key]
        if not (isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)) \
                or (key == "std" and min(v) <= 0):
            raise invalid(source, f"preprocessing.{key}", v,
                          "3 finite numbers" + (", each > 0" if key == "std" else ""))
    if p["interpolation"] not in INTERPOLATIONS:
        raise invalid(source, "preprocessing.interpolation", p["interpolation"], f"one of {', '.join(INTERPOLATIONS)}")
    crop = p["crop_pct"]
    if not _is_number(crop) or not 0 < crop <= 2 or math.floor(size[-1] / crop) > MAX_RESIZE:
        raise invalid(source, "preprocessing.crop_pct", crop,
                      f"a number in (0, 2] with input size / crop_pct <= {MAX_RESIZE}")
    if p.get("crop_mode", "center") not in CROP_MODES:
        raise invalid(source, "preprocessing.crop_mode", p["crop_mode"], f"one of {', '.join(CROP_MODES)}")
    if not isinstance(p.get("grayscale_input", False), bool):
        raise invalid(source, "preprocessing.grayscale_input", p["grayscale_input"], "true or false")


def check_inference_fields(meta: dict, source: str) -> None:
    """tta (views of model/calibrated.py, each at most once) and temperature (a positive finite number)."""
    tta = meta.get("tta")
    if tta is not None and not (isinstance(tta, list) and len(tta) <= len(VIEWS)
                                and all(v in VIEWS for v in tta) and len(set(tta)) == len(tta)):
        raise invalid(source, "tta", tta, f"a list of distinct views from {list(VIEWS)}")
    temperature = meta.get("temperature", 1.0)
    if not _is_number(temperature) or temperature <= 0:
        raise invalid(source, "temperature", temperature, "a positive finite number")
    check_ood(meta.get("ood"), source)


OOD_SCORES = ("knn",)  # model/ood.py's score that a checkpoint may carry
MAX_FEATURES = 1 << 16


def check_ood(record: Any, source: str) -> None:
    """`ood` (model/ood.py): absent, {"skipped": why}, or {"score", "k", "threshold", "features", ...}."""
    if record is None or isinstance(record, dict) and isinstance(record.get("skipped"), str):
        return
    if not isinstance(record, dict) or record.get("score") not in OOD_SCORES:
        raise invalid(source, "ood.score", record.get("score") if isinstance(record, dict) else record,
                      f"one of {list(OOD_SCORES)}")
    if not _is_number(record.get("threshold")):
        raise invalid(source, "ood.threshold", record.get("threshold"), "a finite number")
    if not _is_int(record.get("features")) or not 1 <= record["features"] <= MAX_FEATURES:
        raise invalid(source, "ood.features", record.get("features"), f"an int from 1 to {MAX_FEATURES}")
    if not _is_int(record.get("k")) or record["k"] < 1:
        raise invalid(source, "ood.k", record.get("k"), "a positive int")


def plain_name(name: Any) -> bool:
    """A file name with no dir part: not absolute, no separator, not `.` or `..`, no NUL."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..")
            and not any(c in name for c in "/\\\0") and not Path(name).is_absolute())


def check_file_names(meta: dict, source: str) -> None:
    """`files` (name -> {sha256, bytes}), `onnx.file`, `torchscript.file` and `int8.file`: plain names inside the
    dir."""
    files = meta.get("files")
    if files is not None and not isinstance(files, dict):
        raise invalid(source, "files", files, "an object: file name -> {sha256, bytes}")
    for name, entry in (files or {}).items():
        if not plain_name(name):
            raise invalid(source, "files", name, "a plain file name inside the export dir")
        if not isinstance(entry, dict):
            raise invalid(source, f"files.{name}", entry, "an object with sha256 and bytes")
        if "sha256" in entry and not (isinstance(entry["sha256"], str) and _SHA256.match(entry["sha256"])):
            raise invalid(source, f"files.{name}.sha256", entry["sha256"], "64 lowercase hex digits")
        if "bytes" in entry and not (_is_int(entry["bytes"]) and entry["bytes"] >= 0):
            raise invalid(source, f"files.{name}.bytes", entry["bytes"], "a file size in bytes")
    for fmt in ("onnx", "torchscript", "int8"):
        section = meta.get(fmt)
        if section is not None and not isinstance(section, dict):
            raise invalid(source, fmt, section, "an object")
        if isinstance(section, dict) and "file" in section and not plain_name(section["file"]):
            raise invalid(source, f"{fmt}.file", section["file"], "a plain file name inside the export dir")
