"""training/invariance.py: a model that reads how its files were stored is flagged; one that does not is not."""
from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

from pipeline.data.folder import Split, check_decodable_files
from pipeline.data.loaders import LoaderSettings
from pipeline.runtime.devices import Accel
from pipeline.training.invariance import InvarianceCheck, check_storage_invariance

SETTINGS = LoaderSettings(batch_size=8, eval_batch_size=16, num_workers=0, channels_last=False, max_pixels=10**7,
                          sampler="shuffle", decode="cpu", seed=0)
EVAL_TF = A.Compose([A.Resize(32, 32), ToTensorV2()])  # no normalisation: the channels keep their raw values


class TintReader(torch.nn.Module):
    """Calls an image class 1 when its red channel runs above its green one: a faint tint that only RGB storage keeps
    (the images are grey in content, as a storage confound between greyscale- and RGB-stored classes looks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tint = (x[:, 0].float() - x[:, 1].float()).mean((1, 2))
        return torch.stack([1.5 - tint, tint - 1.5], 1)


class ContentReader(torch.nn.Module):
    """Calls an image class 1 when it is bright: what the image shows, whatever the storage."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x.float().mean((1, 2, 3))
        return torch.stack([128 - level, level - 128], 1)


def _confounded_val(root, n: int = 48) -> Split:
    """Grey X-ray-like gradients; class 0 stored as greyscale JPEG, class 1 as RGB PNG with a +3 red tint. Class 1
    is also brighter, so the content tells the classes apart too."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(n):
        label = i % 2
        grey = np.clip(np.linspace(40, 200, 48)[None, :] + (30 if label else -30) + rng.normal(0, 4, (48, 48)), 0,
                       255).astype(np.uint8)
        if label:
            rgb = np.stack([np.clip(grey.astype(int) + 3, 0, 255).astype(np.uint8), grey, grey], 2)
            path = root / f"b{i}.png"
            Image.fromarray(rgb).save(path)
        else:
            path = root / f"a{i}.jpg"
            Image.fromarray(grey, "L").save(path, quality=95)
        paths.append(str(path))
        labels.append(label)
    return Split(paths, labels, ["normal", "finding"])


def _check(model, val: Split) -> dict:
    files = check_decodable_files(val.paths, SETTINGS.max_pixels, workers=1)
    return check_storage_invariance(model, val, files, EVAL_TF, SETTINGS, Accel(torch.device("cpu")),
                                    InvarianceCheck(max_images=500, monitor="balanced_accuracy", seed=0))


def test_a_model_that_reads_the_storage_is_flagged(tmp_path):
    record = _check(TintReader(), _confounded_val(tmp_path))
    assert record["baseline"] == 1.0 and record["flagged"]
    grey = record["storages"]["greyscale JPEG q90"]
    assert grey["images"] == 48 and grey["flipped"] == 0.5 and grey["change"] == -0.5 and grey["beyond_se"]
    assert record["storages"]["PNG (lossless)"]["flipped"] == 0.0  # the lossless control keeps every prediction
    assert record["storages"]["PNG (lossless)"]["images"] == 24  # the PNG files only


def test_a_model_that_reads_the_content_is_not_flagged(tmp_path):
    record = _check(ContentReader(), _confounded_val(tmp_path))
    assert record["baseline"] == 1.0 and not record["flagged"]
    assert set(record["storages"]) == {"greyscale JPEG q90", "RGB JPEG q90 4:2:0", "PNG (lossless)"}
    assert all(r["flipped"] == 0.0 for r in record["storages"].values())


def test_too_few_val_images_is_a_reported_skip(tmp_path):
    record = _check(ContentReader(), _confounded_val(tmp_path, n=10))
    assert "fewer than" in record["skipped"]
