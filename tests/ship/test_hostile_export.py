"""A hostile or damaged model.json (pipeline.load, predict): every field checked before anything is allocated,
file names confined to the export dir, one-line errors naming the field, the value and the fix."""
from __future__ import annotations

import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline
from pipeline.data.images import PIL_RESAMPLE
from pipeline.errors import ModelFileError
from pipeline.model import meta_check

ROOT = Path(__file__).resolve().parents[2]


def pre(**values):
    """An edit of model.json's preprocessing."""
    return lambda doc: doc["preprocessing"].update(values)


def top(**values):
    """An edit of model.json's top-level fields."""
    return lambda doc: doc.update(values)


HOSTILE = {  # name: (edit of the exported model.json, text the error must contain)
    "huge input_size": (pre(input_size=[3, 100000, 100000]), "preprocessing.input_size=[3, 100000, 100000]"),
    "negative input_size": (pre(input_size=[3, -64, 64]), "preprocessing.input_size=[3, -64, 64]"),
    "input_size a string": (pre(input_size="224"), "preprocessing.input_size='224'"),
    "input_size 4 channels": (pre(input_size=[4, 64, 64]), "preprocessing.input_size=[4, 64, 64]"),
    "input_size floats": (pre(input_size=[3, 64.5, 64]), "preprocessing.input_size"),
    "NaN mean": (pre(mean=[math.nan, 0.5, 0.5]), "preprocessing.mean=[nan"),
    "2 means": (pre(mean=[0.5, 0.5]), "preprocessing.mean"),
    "zero std": (pre(std=[0.0, 0.2, 0.2]), "preprocessing.std=[0.0"),
    "std strings": (pre(std=["a", "b", "c"]), "preprocessing.std"),
    "unknown interpolation": (pre(interpolation="spline"), "preprocessing.interpolation='spline'"),
    "tiny crop_pct": (pre(crop_pct=1e-9), "preprocessing.crop_pct=1e-09"),
    "crop_pct a string": (pre(crop_pct="0.9"), "preprocessing.crop_pct='0.9'"),
    "crop_mode": (pre(crop_mode="zoom"), "preprocessing.crop_mode='zoom'"),
    "preprocessing a list": (top(preprocessing=[1, 2]), "preprocessing=[1, 2]"),
    "num_classes a string": (top(num_classes="3"), "num_classes='3'"),
    "huge num_classes": (top(num_classes=10**9), "num_classes=1000000000"),
    "negative num_classes": (top(num_classes=-1), "num_classes=-1"),
    "class names ints": (top(class_names=[1, 2, 3]), "class_names=1"),
    "arch an int": (top(arch=42), "arch=42"),
    "tta repeated": (top(tta=["hflip"] * 1000), "tta=['hflip'"),
    "negative temperature": (top(temperature=-1.0), "temperature=-1.0"),
    "NaN temperature": (top(temperature=math.nan), "temperature=nan"),
    "feature_levels": (top(feature_levels=[{"x": 1}]), "feature_levels"),
    "onnx.file up and out": (top(onnx={"file": "../../etc/passwd"}), "onnx.file='../../etc/passwd'"),
    "onnx.file absolute": (top(onnx={"file": "/etc/passwd"}), "onnx.file='/etc/passwd'"),
    "files key up and out": (top(files={"../model.safetensors": {"bytes": 1}}), "files='../model.safetensors'"),
    "files sha256 not hex": (top(files={"model.safetensors": {"sha256": ["x"]}}), "files.model.safetensors.sha256"),
    "files a list": (top(files=["model.safetensors"]), "files=['model.safetensors']"),
}


def write_doc(export: Path, doc) -> None:
    (export / "model.json").write_text(json.dumps(doc))  # NaN is written as NaN, as a hostile file may hold


def assert_one_line(info, *texts: str) -> None:
    message = str(info.value)
    assert "\n" not in message and len(message) < 500, message
    for text in texts:
        assert text in message, message


@pytest.mark.parametrize("edit, expected", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_model_json_value_is_one_line_error(exported, tmp_path, edit, expected):
    _, _, out = exported
    bad = Path(shutil.copytree(out, tmp_path / "bad"))
    doc = json.loads((bad / "model.json").read_text())
    edit(doc)
    write_doc(bad, doc)
    with pytest.raises(ModelFileError) as info:
        pipeline.load(bad)
    assert_one_line(info, expected, "model.json", "make export")


@pytest.mark.parametrize("content, expected", [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # nesting deeper than the parser's recursion limit
    ('{"num_classes": 1' + "0" * 5000 + "}", "not valid JSON"),  # an int longer than Python parses
    ("\xff\xfe not utf-8", "not valid JSON"),
    ("[1, 2, 3]", "the JSON=[1, 2, 3]"),
])
def test_unparseable_model_json_is_one_line_error(exported, tmp_path, content, expected):
    _, _, out = exported
    bad = Path(shutil.copytree(out, tmp_path / "bad"))
    (bad / "model.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ModelFileError) as info:
        pipeline.load(bad)
    assert_one_line(info, expected, "make export")


def test_model_json_over_the_size_bound_is_refused_unread(exported, tmp_path, monkeypatch):
    _, _, out = exported
    bad = Path(shutil.copytree(out, tmp_path / "bad"))
    doc = json.loads((bad / "model.json").read_text())
    doc["padding"] = "x" * (meta_check.MAX_JSON_BYTES + 1)
    write_doc(bad, doc)
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("an oversized model.json was parsed"))
    with pytest.raises(ModelFileError) as info:
        pipeline.load(bad)
    assert_one_line(info, "over 16 MiB")


@pytest.mark.parametrize("name, backend", [("model.safetensors", "torch"), ("model.onnx", "onnx")])
def test_symlink_out_of_the_export_dir_is_refused(exported, tmp_path, name, backend):
    _, _, out = exported
    bad = Path(shutil.copytree(out, tmp_path / "bad"))
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.copy(out / name, outside)  # the very bytes: the sha256 in model.json matches, only the place is wrong
    (bad / name).unlink()
    (bad / name).symlink_to(outside)
    with pytest.raises(ModelFileError) as info:
        pipeline.load(bad, backend=backend)
    assert_one_line(info, f"{bad / name}", "points outside", "cp -L")


def test_symlink_inside_the_export_dir_still_loads(exported, tmp_path):
    _, _, out = exported
    ok = Path(shutil.copytree(out, tmp_path / "ok"))
    (ok / "real").mkdir()
    (ok / "model.safetensors").rename(ok / "real" / "model.safetensors")
    (ok / "model.safetensors").symlink_to(Path("real") / "model.safetensors")
    assert pipeline.load(ok).class_names == pipeline.load(out).class_names


def test_known_interpolations_are_those_the_resizer_implements():
    assert set(meta_check.INTERPOLATIONS) == set(PIL_RESAMPLE)


def _limit_memory() -> None:
    """The child may map 6 GiB at most: without the guard it fails fast here instead of swapping the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def test_predict_cli_on_a_huge_input_size_exits_with_one_line_error_quickly(exported, tmp_path):
    data, _, out = exported
    bad = Path(shutil.copytree(out, tmp_path / "bad"))
    doc = json.loads((bad / "model.json").read_text())
    doc["preprocessing"]["input_size"] = [3, 100000, 100000]
    write_doc(bad, doc)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.predict", f"run={bad}",
                           f"images={data / 'val/red/red_1.png'}", f"csv={tmp_path / 'p.csv'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory)
    seconds = time.monotonic() - start
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err[-2000:]
    assert "preprocessing.input_size=[3, 100000, 100000]" in err.splitlines()[-1]
    assert seconds < 60, seconds  # the interpreter and torch start take a few s; the bad value is caught at once
    assert not (tmp_path / "p.csv").exists()
