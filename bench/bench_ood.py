"""Out-of-distribution scores measured against each other (issue 35): which score tells training-like images from
others, on models `make train` ships.

    .venv/bin/python bench/bench_ood.py [--datasets digits flowers chest_xray hymenoptera] [--images 300]
        [--bank 1000] [--seed 42] [--work DIR] [--out DIR]                                   (make bench-ood ARGS="...")

Per dataset, one default run (2-minute auto) is trained on all classes but `held_out` (where the dataset has
more than 2 classes). The in-distribution images are the run's test split. The far sets are other datasets'
images (a digits model shown photos, a photo model shown X-rays); the near set is the held-out class. For each
score of model/ood.py (fitted on at most `--bank` train images, thresholded to keep 95% of val):
AUROC (in-distribution = positive) and the share of each set flagged unknown. Writes bench_ood.json/.md to --out.
Needs ../shared/datasets (DATASETS_DIR) for the photo sets; digits is generated.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.images import IMAGE_EXTENSIONS  # noqa: E402
from pipeline.data.sources import write_digits_imagefolder  # noqa: E402
from pipeline.model import ood  # noqa: E402
from pipeline.ship.loading import load  # noqa: E402

SHARED = Path(os.environ.get("DATASETS_DIR", ROOT.parent / "shared" / "datasets"))
DATASETS = {  # name -> (root, class held out of training or None, far sets)
    "digits": (ROOT / "data" / "digits", "9", ["flowers", "chest_xray"]),
    "flowers": (SHARED / "flowers", "tulips", ["chest_xray", "digits"]),
    "chest_xray": (SHARED / "chest_xray", None, ["flowers", "hymenoptera"]),
    "hymenoptera": (SHARED / "hymenoptera", None, ["chest_xray", "digits"]),
}
KEEP = 0.95
SCORES = ("knn", "mahalanobis", "energy", "msp")  # knn: model/ood.py's, what runs ship; the others are here


class MahalanobisScore(nn.Module):
    """features (N, D) -> minus the smallest squared Mahalanobis distance to a class mean (N,). The shared precision
    P = L L^T is stored as `projection` L and the class means as `means_projected` (mu L), so the distance is a
    squared norm: |f L - mu L|^2."""

    def __init__(self, means_projected: torch.Tensor, projection: torch.Tensor):
        super().__init__()
        self.register_buffer("means_projected", means_projected.float())
        self.register_buffer("projection", projection.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = features.float() @ self.projection
        m = self.means_projected
        dist = (z * z).sum(1, keepdim=True) - 2 * z @ m.T + (m * m).sum(1)[None, :]
        return -dist.min(dim=1).values



def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, num_classes: int) -> MahalanobisScore:
    """Class means and one shared covariance of the train features (Ledoit-Wolf shrinkage: the sample covariance
    of a few hundred images of a 1280-wide feature is singular). A class without train rows gets no mean."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    present = [k for k in range(num_classes) if np.any(labels == k)]
    means = np.stack([x[labels == k].mean(0) for k in present])
    centred = x - means[np.searchsorted(present, labels)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    projection = np.linalg.cholesky((precision + precision.T) / 2)  # P = L L^T, so |(f - mu) L|^2 is the distance
    return MahalanobisScore(torch.from_numpy(means @ projection), torch.from_numpy(projection))


def energy(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=1)


def msp(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1).max(dim=1).values


def images_of(root: Path) -> list[tuple[str, str]]:
    """(path, class) of every image under root/<split>/<class>/ (or root/<class>/)."""
    rows = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            rows.append((str(p), p.parent.name))
    return rows


def sample(items: list, n: int, seed: int) -> list:
    if len(items) <= n:
        return items
    return [items[i] for i in sorted(np.random.default_rng(seed).choice(len(items), n, replace=False))]


def train_run(name: str, work: Path, seed: int) -> Path:
    """The default run of `name`, minus its held-out class (a manifest of the other classes' files)."""
    root, held_out, _ = DATASETS[name]
    run_dir = work / f"{name}_run"
    if (run_dir / "best.json").is_file() and (run_dir / "metrics.json").is_file():
        return run_dir
    args = [f"dataset={name}", f"seed={seed}", f"output_dir={run_dir}", "trainer.progress=false",
            "dataset.test_fraction=0.2"]
    if name != "digits":
        args.append(f"dataset.root={root}")
    if held_out is not None:
        if name == "digits" and not root.is_dir():
            write_digits_imagefolder(root)
        manifest = work / f"{name}_without_{held_out}.csv"
        with open(manifest, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            writer.writerows(r for r in images_of(root) if r[1] != held_out)
        args.append(f"dataset.manifest={manifest}")
    subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=ROOT, check=True)
    return run_dir


@torch.inference_mode()
def logits_features(model, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    out_l, out_f = [], []
    for start in range(0, len(paths), 64):
        batch = torch.stack([model.preprocess(p) for p in paths[start:start + 64]])
        logits, feats = ood.logits_and_features(model.model, batch)
        out_l.append(logits.float())
        out_f.append(feats)
    return torch.cat(out_l), torch.cat(out_f)


def split_rows(run_dir: Path) -> dict[str, list[tuple[str, str]]]:
    rows: dict[str, list] = {}
    with open(run_dir / "split.csv") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["split"], []).append((row["path"], row["label"]))
    return rows


def measure(name: str, work: Path, n: int, seed: int, bank: int) -> dict:
    run_dir = train_run(name, work, seed)
    model = load(run_dir)
    classes = model.class_names
    splits = split_rows(run_dir)
    train = sample(splits["train"], bank, seed)
    f_train = logits_features(model, [p for p, _ in train])[1]
    y_train = np.array([classes.index(c) for _, c in train])
    maha = fit_mahalanobis(f_train.numpy(), y_train, len(classes))
    knn = ood.fit_knn(f_train.numpy())
    scorers = {"mahalanobis": lambda lg, ft: maha(ft), "energy": lambda lg, ft: energy(lg),
               "msp": lambda lg, ft: msp(lg), "knn": lambda lg, ft: knn(ft)}
    sets = {"val": sample(splits["val"], n, seed), "test (in)": sample(splits.get("test", []), n, seed)}
    root, held_out, far = DATASETS[name]
    if not root.is_dir() and name == "digits":
        write_digits_imagefolder(root)
    if held_out is not None:
        sets[f"near: held-out {held_out}"] = sample([r for r in images_of(root) if r[1] == held_out], n, seed)
    for other in far:
        other_root = DATASETS[other][0]
        if other_root.is_dir():
            sets[f"far: {other}"] = sample(images_of(other_root), n, seed)
    scored = {}
    for set_name, rows in sets.items():
        logits, feats = logits_features(model, [p for p, _ in rows])
        scored[set_name] = {s: fn(logits, feats).numpy() for s, fn in scorers.items()}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = {"run_dir": str(run_dir), "strategy": metrics.get("strategy"), "classes": classes,
              "test_balanced_accuracy": (metrics.get("test") or {}).get("balanced_accuracy"), "scores": {}}
    for s in scorers:
        threshold = ood.keep_threshold(scored["val"][s], KEEP)
        inside = scored["test (in)"][s]
        row = {"threshold": threshold, "flagged": {k: float(np.mean(v[s] < threshold)) for k, v in scored.items()},
               "auroc": {}}
        for set_name, v in scored.items():
            if set_name.startswith(("near", "far")):
                y = np.r_[np.ones(len(inside)), np.zeros(len(v[s]))]
                row["auroc"][set_name] = float(roc_auc_score(y, np.r_[inside, v[s]]))
        result["scores"][s] = row
    return result


def table(results: dict) -> str:
    lines = ["| model (test bal. acc) | set | " + " | ".join(f"{s} AUROC / flagged" for s in SCORES) + " |",
             "|---|---|" + "---|" * len(SCORES)]
    for name, r in results.items():
        sets = [k for k in r["scores"]["energy"]["flagged"] if k != "val"]
        for k in sets:
            cells = []
            for s in SCORES:
                row = r["scores"][s]
                auroc = row["auroc"].get(k)
                cells.append((f"{auroc:.3f} / " if auroc is not None else "- / ") + f"{100 * row['flagged'][k]:.0f}%")
            acc = r["test_balanced_accuracy"]
            lines.append(f"| {name} ({acc:.3f}) | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--images", type=int, default=300, help="images per scored set")
    ap.add_argument("--bank", type=int, default=1000, help="train images fitted on (trainer.ood_fit_images)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench" / "ood"))
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench"))
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results = {name: measure(name, work, args.images, args.seed, args.bank) for name in args.datasets}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ood.json").write_text(json.dumps(results, indent=1))
    md = table(results)
    (out / "bench_ood.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
