"""data/listing.py: class names that differ only in letter case or Unicode normal form (NFC/NFD) are a one-line
error naming both and the fix, for class folders (within a split and across splits) and manifest labels."""
from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from conftest import COLORS, write_image
from pipeline.data.folder import SplitLayout, check_layout, load_imagefolder
from pipeline.errors import ConfigError

NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


def _images(folder: Path, n: int = 3) -> None:
    for i in range(n):
        write_image(folder / f"{i}.png", COLORS["red"], size=16, seed=i)


def test_class_folders_differing_only_in_case_are_a_one_line_error(tmp_path):
    for name in ("Cat", "cat", "dog"):
        _images(tmp_path / "ds" / "train" / name)
    with pytest.raises(ConfigError) as e:
        load_imagefolder(tmp_path / "ds")
    message = str(e.value)
    assert "\n" not in message and f"{tmp_path}/ds/train/Cat and {tmp_path}/ds/train/cat" in message
    assert "differ only in letter case" in message and "rename one, or move its images into the other" in message


def test_class_folders_in_nfc_and_nfd_are_a_one_line_error_naming_the_code_points(tmp_path):
    assert NFC != NFD
    for name in (NFC, NFD, "tea"):  # no train/ folder: the class folders are the dataset
        _images(tmp_path / "ds" / name)
    assert len(list((tmp_path / "ds").iterdir())) == 3  # two folders on disk that print the same
    with pytest.raises(ConfigError, match=r"differ only in Unicode normal form \('cafe\\u0301' vs 'caf\\xe9'") as e:
        check_layout(tmp_path / "ds", SplitLayout(), min_per_class=1)
    assert "rename one" in str(e.value) and "\n" not in str(e.value)


def test_a_val_folder_spelling_a_train_class_differently_is_an_error(tmp_path):
    for split, name in (("train", "Cat"), ("train", "dog"), ("val", "cat"), ("val", "dog")):
        _images(tmp_path / "ds" / split / name)
    with pytest.raises(ConfigError, match=r"train/Cat and .*val/cat differ only in letter case"):
        load_imagefolder(tmp_path / "ds")


def test_manifest_labels_differing_only_in_case_or_form_are_an_error(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"{i}.png", COLORS["blue"], size=16, seed=i)
    for labels, how in ((["Cat", "dog", "cat", "dog"], "letter case"), ([NFC, "dog", NFD, "dog"], "Unicode")):
        csv = tmp_path / "m.csv"
        csv.write_text("path,label\n" + "".join(f"{i}.png,{label}\n" for i, label in enumerate(labels)),
                       encoding="utf-8")
        with pytest.raises(ConfigError) as e:
            load_imagefolder(tmp_path, SplitLayout(manifest=str(csv)))
        message = str(e.value)
        assert f"dataset.manifest {csv}: labels '{labels[0]}' (line 2) and '{labels[2]}' (line 4)" in message
        assert how in message and "use one spelling of the label in every row" in message


def test_distinct_names_are_not_an_error(tmp_path):
    for name in ("cat", "cats", "Dog"):
        _images(tmp_path / "ds" / "train" / name)
    assert load_imagefolder(tmp_path / "ds", SplitLayout(val_fraction=0.34)).classes == ["Dog", "cat", "cats"]
