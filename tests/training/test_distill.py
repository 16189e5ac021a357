"""Distillation (training/distill.py): the KD loss, the teacher's logits through the feature cache, and a student
run on the teacher's own split."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_cfg, write_tiny_folder
from pipeline.config.schema import DistillConfig
from pipeline.errors import ConfigError, MissingFileError
from pipeline.train import train
from pipeline.training.distill import DistillLoss, check


def test_the_kd_term_pulls_the_student_to_the_teacher_not_the_labels():
    """A linear student trained with alpha=1 on a teacher that swaps two classes predicts the teacher's classes;
    with alpha=0 it predicts the labels. Fails if the KD term is dropped or its direction flipped."""
    torch.manual_seed(0)
    x = torch.randn(120, 6)
    labels = x[:, :3].argmax(1)
    teacher = torch.nn.functional.one_hot(labels, 3).float() * 8
    teacher = teacher[:, [1, 0, 2]]  # the teacher says 1 where the label is 0, and 0 where it is 1
    targets = torch.column_stack([labels.float(), teacher])

    def fit(alpha: float) -> torch.Tensor:
        student = torch.nn.Linear(6, 3)
        opt = torch.optim.Adam(student.parameters(), lr=0.05)
        loss_fn = DistillLoss(torch.nn.CrossEntropyLoss(), alpha=alpha, temperature=2.0)
        for _ in range(300):
            opt.zero_grad()
            loss_fn(student(x), targets).backward()
            opt.step()
        return student(x).argmax(1)

    taught, alone = fit(1.0), fit(0.0)
    assert (taught == teacher.argmax(1)).float().mean() > 0.95
    assert (alone == labels).float().mean() > 0.95


def test_kd_loss_values():
    """alpha=0 is the label loss; plain labels give the label loss; a teacher equal to the student adds nothing;
    a row without teacher logits (NaN: its file did not decode) is left out of the KD term."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 1])
    ce = torch.nn.CrossEntropyLoss()
    same = torch.column_stack([labels.float(), logits])
    assert torch.isclose(DistillLoss(ce, 0.0, 2.0)(logits, same), ce(logits, labels))
    assert torch.isclose(DistillLoss(ce, 0.7, 2.0)(logits, labels), ce(logits, labels))
    assert torch.isclose(DistillLoss(ce, 1.0, 3.0)(logits, same), torch.tensor(0.0), atol=1e-6)
    other = torch.column_stack([labels.float(), torch.tensor([[0.0, 3.0, 0.0], [float("nan")] * 3])])
    kd_first = DistillLoss(ce, 1.0, 1.0)(logits, other)
    expected = torch.nn.functional.kl_div(torch.log_softmax(logits[:1], 1), torch.log_softmax(other[:1, 1:], 1),
                                          log_target=True, reduction="batchmean")
    assert torch.isclose(kd_first, expected)


def test_what_a_student_cannot_combine_with_is_one_line():
    taught = DistillConfig(teacher="run", alpha=0.5, temperature=2.0)
    for kwargs, word in ((dict(mode="linear_probe", boundary_cache="auto", mixing=False), "strategy"),
                         (dict(mode="auto", boundary_cache="auto", mixing=False), "strategy"),
                         (dict(mode="partial", boundary_cache="always", mixing=False), "boundary_cache"),
                         (dict(mode="partial", boundary_cache="auto", mixing=True), "mixup")):
        with pytest.raises(ConfigError, match=word):
            check(taught, **kwargs)
    check(taught, mode="partial", boundary_cache="auto", mixing=False)
    check(DistillConfig(teacher=None, alpha=0.5, temperature=2.0), mode="auto", boundary_cache="always", mixing=True)


def _cfg(tmp_path: Path, run: str, *overrides: str):
    return compose_cfg([f"output_dir={tmp_path / run}", f"data_dir={tmp_path / 'data'}", "trainer=smoke",
                        "backbone=tiny", "backbone.input_size=64", "trainer.max_train_batches=0",
                        "trainer.epochs=2", "optim.lr=0.01", "audit.invariance_images=0", "trainer.ood=off",
                        f"features.cache_dir={tmp_path / 'features'}", *overrides])


def test_a_student_trains_on_the_teachers_split_and_cached_logits(tmp_path):
    data = write_tiny_folder(tmp_path / "tiny")
    train(_cfg(tmp_path, "teacher", "dataset=folder", f"dataset.root={data}", "strategy=finetune"))
    teacher = tmp_path / "teacher"
    # the command's dataset is the default (digits): the student still trains on the teacher's images and split
    student = train(_cfg(tmp_path, "student", "strategy=partial", f"distill.teacher={teacher}"))
    record = student["distill"]
    assert record["teacher"] == str(teacher.resolve()) and record["images"] == 36 and not record["cache_hit"]
    assert 0 <= record["teacher_train_accuracy"] <= 1 and record["alpha"] == 0.5
    assert (tmp_path / "student" / "split.csv").read_text() == (teacher / "split.csv").read_text()
    entries = [json.loads(p.read_text()) for p in (tmp_path / "features").glob("*.json")]
    assert [e["name"] for e in entries] == ["teacher logits"] and entries[0]["dim"] == 3
    again = train(_cfg(tmp_path, "student2", "strategy=partial", f"distill.teacher={teacher}"))
    assert again["distill"]["cache_hit"]
    alone = train(_cfg(tmp_path, "alone", "strategy=partial", f"dataset.manifest={teacher / 'split.csv'}",
                       "dataset=folder", f"dataset.root={data}"))
    assert "distill" not in alone
    # same seed, data and split: the KD term is what changes the student's training loss
    assert not math.isclose(student["history"][0]["train_loss"], alone["history"][0]["train_loss"], rel_tol=1e-4)
    assert np.isfinite(student["history"][-1]["train_loss"])


def test_a_missing_or_unfinished_teacher_is_one_line(tmp_path):
    with pytest.raises(MissingFileError, match="distill.teacher=.*no best.json"):
        train(_cfg(tmp_path, "student", "strategy=partial", f"distill.teacher={tmp_path / 'nope'}"))
