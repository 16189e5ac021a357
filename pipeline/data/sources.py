"""Where dataset roots come from: the embedded digits set and downloads for online users (data/build.py
chooses between them and a folder on disk)."""
from __future__ import annotations

import logging
import os
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import MissingFileError
from pipeline.runtime.files import staged_dir

_logger = logging.getLogger(__name__)


DIGITS_MARKS = tuple(f".complete_{side}" for side in (32, 64, 128, 224, 256))  # trees of older versions


def write_digits_imagefolder(root: str | Path, image_size: int = 64) -> Path:
    """Write sklearn's 8x8 digits (1797 images, ships with scikit-learn) as PNGs in `root/train/<digit>/`.

    Idempotent: a complete tree (marker file present) is left alone. `root` must be missing, empty or a tree
    this function wrote: anything else is a one-line error, never replaced (the user forgot `dataset=folder`).
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    marker = root / f".complete_{image_size}"
    if marker.is_file():
        return root
    fix = (f"dataset.root={root} is where the digits dataset is generated; for your own images add dataset=folder "
           "(make train dataset=folder dataset.root=...)")
    digits = load_digits()
    with staged_dir(root, kind="dataset", fix=fix, legacy_marks=DIGITS_MARKS) as tmp:
        for i, (img, label) in enumerate(zip(digits.images, digits.target)):
            pixels = (img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            big = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BICUBIC)
            out = tmp / "train" / str(label)
            out.mkdir(parents=True, exist_ok=True)
            big.save(out / f"{i:04d}.png")  # inside the staged dir: the whole tree appears at once
        (tmp / marker.name).touch()
    _logger.info("Wrote %d digits images to %s", len(digits.images), root)
    return root


def download_and_extract(url: str, root: Path, hint: str = "") -> Path:
    """Fetch an archive (zip/tar) and unpack it so that `root/train` exists (online users)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    fix = f"dataset.root={root} holds no class folders to use and is not empty: point it at a new dir for the download"
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp, staged_dir(root, kind="dataset", fix=fix) as staged:
        archive = Path(tmp) / Path(url).name
        _logger.info("Downloading %s", url)
        try:
            urllib.request.urlretrieve(url, archive)
        except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, a malformed URL
            raise MissingFileError(f"Could not download dataset.url={url} ({getattr(e, 'reason', None) or e}); "
                                   f"offline? {hint or 'fetch it by hand and set dataset.root'}") from None
        unpack = Path(tmp) / "unpacked"
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(unpack)
        else:
            with tarfile.open(archive) as t:
                t.extractall(unpack, filter="data")
        top = [p for p in unpack.iterdir() if p.is_dir()]
        tree = top[0] if len(top) == 1 else unpack
        if (tree / "train").is_dir():
            for item in tree.iterdir():
                os.replace(item, staged / item.name)
        else:  # flat archive of class folders -> make it the train split
            os.replace(tree, staged / "train")
    return root
