"""What the fit leaves behind: `best` holds the trained model's own weights, and the class weights shape training
on both the fine-tune path (training/fit.py) and the cached linear-probe path (features/cached_fit.py)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import pipeline.train
from pipeline.model.checkpoint import load_checkpoint
from pipeline.train import train


def test_best_checkpoint_holds_the_trained_models_own_weights(tiny_folder, cfg_factory, monkeypatch):
    """With one epoch, `best` is the model as training left it: same tensors, same outputs (not merely a file that
    loads twice alike)."""
    trained = {}

    def keep_model(model, *args, **kwargs):
        result = real_fit(model, *args, **kwargs)
        trained["model"] = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()  # as saved
        return result

    real_fit = pipeline.train.fit
    monkeypatch.setattr(pipeline.train, "fit", keep_model)
    cfg = cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "strategy=finetune",
                      "trainer.epochs=1", "optim.lr=0.01")
    train(cfg)
    best, meta = load_checkpoint(cfg.output_dir)
    live = trained["model"].state_dict()
    assert meta["epoch"] == 1 and set(best.state_dict()) == set(live)
    for name, tensor in best.state_dict().items():
        assert torch.equal(tensor, live[name].contiguous()), name
    x = torch.randn(4, 3, *meta["preprocessing"]["input_size"][1:])
    with torch.no_grad():
        torch.testing.assert_close(best(x), trained["model"](x), rtol=0, atol=0)
    assert not torch.equal(live["classifier.weight"], torch.zeros_like(live["classifier.weight"]))  # it trained


def _predicted_share(run_dir: Path, cls: int) -> float:
    """Share of val images predicted as class `cls`, from the run's confusion matrix (rows true, cols predicted)."""
    rows = [line.split(",")[1:] for line in (run_dir / "confusion_val.csv").read_text().splitlines()[1:]]
    counts = [[int(v) for v in row] for row in rows]
    return sum(row[cls] for row in counts) / sum(map(sum, counts))


WEIGHTS = "loss.class_weights={blue: 1.0, green: 0.001, red: 0.001}"


@pytest.mark.parametrize("path, weighted_share", [
    # the fine-tune loop (training/fit.py) training the head of the frozen random-init model: with the whole model
    # trained, 15 steps leave BN's running statistics half-updated and the val predictions turn on the augmentation
    # draws (blue share 0-1 over seeds, weighted or not); the frozen model's are stable (seeds 42, 1, 2: 0.33 / 0 /
    # 0.33 plain, 1 / 0.92 / 1 weighted)
    (("strategy=linear_probe", "features.cached=false", "optim.lr=0.01", "trainer.epochs=3",
      "trainer.max_train_batches=0"), 0.9),
    (("strategy=linear_probe", "features.cached=true", "features.head=linear", "trainer.epochs=5"), 0.9),
    # sklearn's class_weight, with C chosen by balanced-accuracy CV, pulls less hard (measured 0.75)
    (("strategy=linear_probe", "features.cached=true", "features.head=logistic"), 0.65),
])
def test_class_weights_steer_training_on_both_paths(tiny_folder, cfg_factory, tmp_path, path, weighted_share):
    """Weighting blue 1000x over the other classes makes (nearly) every val image blue; unweighted, the same run
    predicts about a third blue. Dropping the weights from the loss on either path fails this test."""
    common = ("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "backbone.input_size=32",
              "loss.label_smoothing=0", *path)
    shares = {}
    for name, extra in (("plain", ()), ("weighted", (WEIGHTS,))):
        cfg = cfg_factory(*common, *extra, f"output_dir={tmp_path / name}")
        train(cfg)
        shares[name] = _predicted_share(Path(cfg.output_dir), cls=0)
    plan = json.loads((tmp_path / "weighted" / "class_weights.json").read_text())
    assert plan["weights"] == {"blue": 1.0, "green": 0.001, "red": 0.001}
    assert shares["weighted"] >= weighted_share and shares["plain"] <= 0.6, shares
    assert shares["weighted"] - shares["plain"] >= 0.3, shares
