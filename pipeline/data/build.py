"""The dataset from the `dataset` config group: its root prepared, its files listed, checked and split."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config.schema import DatasetConfig
from pipeline.data import folder, listing, manifest, sources
from pipeline.errors import ConfigError, MissingFileError

_logger = logging.getLogger(__name__)


def dataset_root(dataset: DatasetConfig) -> Path:
    """The dataset root: `root/train/<class>/` or `root/<class>/` (data/listing.py), generated or downloaded when
    configured; with `dataset.manifest`, the CSV's folder (its relative paths start there)."""
    if dataset.manifest:
        return manifest.manifest_file(dataset.manifest).parent
    root = OmegaConf.select(dataset, "root", throw_on_missing=False) if OmegaConf.is_config(dataset) \
        else dataset.root
    if root in (None, "", "???"):
        raise ConfigError(f"dataset '{dataset.name}' needs a root: add dataset.root=/path/to/images "
                          "(or dataset.manifest=/path/file.csv)")
    path = Path(root).expanduser()
    if dataset.source == "digits":
        return sources.write_digits_imagefolder(path, dataset.image_size)
    if (path / dataset.train_split).is_dir() or (path.is_dir() and listing.find_classes(path)):
        return path
    if dataset.download and dataset.url:
        return sources.download_and_extract(dataset.url, path, dataset.download_hint)
    hint = dataset.download_hint or ("point dataset.root at a folder of class folders (<class>/<image> or "
                                     f"{dataset.train_split}/<class>/<image>), or set dataset.manifest=/path/file.csv")
    raise MissingFileError(f"Dataset '{dataset.name}' not found at {path.resolve()} (no class folders, no "
                           f"{dataset.train_split}/ folder): {hint}")


def list_data(dataset: DatasetConfig) -> tuple[listing.Listing, Path]:
    """The dataset's files and labels by name, no file read (make preview)."""
    root = dataset_root(dataset)
    return folder.SplitLayout.from_group(dataset).listing(root), root


def build_data(dataset: DatasetConfig, *, seed: int) -> tuple[folder.DatasetSplits, Path]:
    """List, check, probe and split the dataset (train/ tree, class folders or `dataset.manifest`); `seed`
    draws the val/test split where the dataset has none."""
    root = dataset_root(dataset)
    layout = folder.SplitLayout.from_group(dataset)
    folder.check_layout(root, layout, min_per_class=dataset.min_per_class)  # a listing: fails before any file is read
    splits = folder.load_imagefolder(root, layout, seed=seed, max_pixels=dataset.max_pixels,
                                     min_per_class=dataset.min_per_class, workers=dataset.audit_workers)
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        if split is not None:
            _logger.info("%s: %d images %s", name, len(split), split.counts())
    return splits, root


def write_split(run_dir: Path, splits: folder.DatasetSplits) -> Path:
    """`split.csv`: every image the run uses, with its label and split (data/manifest.py); given back as
    `dataset.manifest`, it reproduces this split exactly."""
    return manifest.write_split_csv(run_dir / manifest.SPLIT_CSV, splits.rows())
