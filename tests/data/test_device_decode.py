"""data/device_decode.py: eval preprocessing on the device equals the CPU path within the stated tolerance (run here
with device=cpu: the same code, the CPU JPEG decoder), falls back for other formats, and `gpu` needs CUDA."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_image

from conftest import compose_cfg
from pipeline.config import check_values
from pipeline.data import device_decode
from pipeline.data.augment import build_eval_transform
from pipeline.data.folder import Split
from pipeline.data.images import MAX_FILE_BYTES, ImageDecodeError
from pipeline.errors import ConfigError
from pipeline.training.validate import validate_config

CPU = torch.device("cpu")
PREP = {"input_size": [3, 96, 96], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
        "crop_pct": 0.875, "crop_mode": "center"}


@pytest.fixture
def photos(tmp_path) -> list[str]:
    """Real photos (sklearn's samples) as JPEG at three sizes and orientations, a PNG, and a small image."""
    paths = []
    for k, name in enumerate(("china.jpg", "flower.jpg")):
        photo = load_sample_image(name)
        for j, (w, h) in enumerate(((640, 427), (300, 451), (150, 100))):
            path = tmp_path / f"{k}_{j}.jpg"
            Image.fromarray(photo).resize((w, h)).save(path, quality=90)
            paths.append(str(path))
    Image.fromarray(load_sample_image("china.jpg")).resize((200, 120)).save(tmp_path / "p.png")
    return paths + [str(tmp_path / "p.png")]


@pytest.mark.parametrize("prep", [PREP, {**PREP, "interpolation": "bilinear", "crop_pct": 1.0},
                                  {**PREP, "grayscale_input": True}])
def test_device_preprocessing_matches_the_cpu_path_within_tolerance(photos, prep):
    cpu_tf = build_eval_transform(prep)
    batches = device_decode.DeviceBatches(Split(photos, [0] * len(photos), ["x"]), prep, CPU, batch_size=4,
                                          max_pixels=10**9)
    got = torch.cat([x for x, _ in batches])
    from pipeline.data.images import load_rgb
    want = torch.stack([cpu_tf(image=load_rgb(p))["image"] for p in photos])
    diff = (got - want).abs()
    assert got.shape == want.shape == (len(photos), 3, 96, 96)
    assert diff.max() <= device_decode.PARITY_TOLERANCE and diff.mean() <= device_decode.MEAN_TOLERANCE, \
        (float(diff.max()), float(diff.mean()))


def test_broken_files_are_skipped_and_indices_kept(photos, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)  # a JPEG header, then nothing
    paths = [photos[0], str(tmp_path / "bad.jpg"), photos[1]]
    batches = list(device_decode.DeviceBatches(Split(paths, [0, 1, 2], ["a", "b", "c"]), PREP, CPU, batch_size=8,
                                               max_pixels=10**9, indices=[0, 1, 2]))
    x, y, idx = batches[0]
    assert len(x) == 2 and y.tolist() == [0, 2] and idx.tolist() == [0, 2]


def test_auto_decodes_on_the_device_only_on_cuda_and_gpu_needs_cuda(monkeypatch):
    assert device_decode.resolve_decode("auto", torch.device("cpu")) == "cpu"
    assert device_decode.resolve_decode("auto", torch.device("cuda")) == "gpu"
    assert device_decode.resolve_decode("cpu", torch.device("cuda")) == "cpu"
    check_values(compose_cfg(["dataset.decode=gpu"]))  # a valid value ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="dataset.decode=gpu needs a CUDA device"):  # ... that needs CUDA
        validate_config(compose_cfg(["backbone=tiny", "dataset.decode=gpu"]))


def test_extraction_on_the_device_gives_the_cpu_features(tiny_folder):
    import timm

    from pipeline.data.folder import list_split
    from pipeline.features.cache import Extraction, load_or_extract

    classes = ["blue", "green", "red"]
    paths, labels, _ = list_split(tiny_folder / "train", classes)
    split = Split(paths, labels, classes)
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    cpu = load_or_extract(model, split, build_eval_transform(PREP), Extraction(CPU, None, batch_size=16),
                          key_parts={"k": 1})
    dev = load_or_extract(model, split, build_eval_transform(PREP),
                          Extraction(CPU, None, batch_size=16, device_preprocessing=PREP), key_parts={"k": 1})
    assert cpu["key"] != dev["key"] and torch.equal(cpu["index"], dev["index"])
    cos = torch.nn.functional.cosine_similarity(cpu["features"], dev["features"])
    assert cos.min() > 0.99, float(cos.min())


def test_a_run_evaluates_on_the_device_path_like_on_the_cpu(tiny_folder, cfg_factory, tmp_path, monkeypatch):
    """The val/test loaders of a run use DeviceBatches when the decode resolves to gpu (forced here on the CPU):
    the same predictions as the CPU loaders on these images."""
    import pipeline.data.loaders as loaders
    from pipeline.train import train

    common = ("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "backbone.input_size=64",
              "strategy=finetune", "trainer.epochs=1")
    on_cpu = train(cfg_factory(*common, f"output_dir={tmp_path / 'cpu'}"))
    calls = []
    monkeypatch.setattr(loaders, "resolve_decode", lambda setting, device: calls.append(device) or "gpu")
    on_device = train(cfg_factory(*common, f"output_dir={tmp_path / 'dev'}"))
    assert calls and on_device["val"]["accuracy"] == on_cpu["val"]["accuracy"]
    assert on_device["val"]["loss"] == pytest.approx(on_cpu["val"]["loss"], abs=0.02)


def test_the_header_is_checked_before_the_device_decodes(tmp_path, monkeypatch):
    """A strip, an image over dataset.max_pixels and a file over the size cap are skipped before decode_jpeg."""
    Image.new("RGB", (60000, 1), (9, 9, 9)).save(tmp_path / "strip.jpg")
    Image.fromarray(load_sample_image("china.jpg")).save(tmp_path / "big.jpg")  # 640x427 = 273280 px
    with open(tmp_path / "huge.jpg", "wb") as f:
        f.write(b"\xff\xd8\xff")
        f.truncate(MAX_FILE_BYTES + 1)
    calls = []
    real = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    skip_log = tmp_path / "skips.jsonl"
    paths = [str(tmp_path / name) for name in ("strip.jpg", "big.jpg", "huge.jpg")]
    batches = list(device_decode.DeviceBatches(Split(paths, [0, 1, 2], ["a", "b", "c"]), PREP, CPU, batch_size=8,
                                               max_pixels=100_000, skip_log=skip_log))
    reasons = [json.loads(line)["reason"] for line in skip_log.read_text().splitlines()]
    assert batches == [None] and not calls
    assert "is a strip" in reasons[0] and "exceeds dataset.max_pixels=100000" in reasons[1]
    assert "MAX_FILE_BYTES" in reasons[2]
    with pytest.raises(ImageDecodeError, match="is a strip"):  # an in-memory strip: the resize refuses it
        device_decode.preprocess(torch.zeros((3, 1, 60000), dtype=torch.uint8), PREP)
