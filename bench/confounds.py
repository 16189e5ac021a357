"""Storage-confound check (data/shortcuts.py `find_confounds`): false warnings and constructed confounds.

    .venv/bin/python bench/confounds.py [--datasets digits,hymenoptera,flowers,chest_xray] [--draws 200]

1. shared:      the audit's shortcut part on every shared dataset, full size, with the configured thresholds
                (conf/audit/default.yaml): the largest class-pair separation of each attribute, the pairs
                found (0 expected) and the metadata classifier's skill.
2. subsampled:  `--draws` random draws of n images per class (n = 30, 50, 100) from those datasets' records: how
                often any pair warns when the classes are small (0 expected; the confidence bound's job).
3. constructed: real photos of $DATASETS_DIR (default ../shared/datasets) written to a temporary folder by two
                or more storage pipelines (greyscale vs RGB JPEG, the issue's 99% / 88% mix among four
                classes, sizes, JPEG qualities; and a weak mix that must not warn), loaded and audited as
                `make audit` does (`load_imagefolder` + `audit_dataset`). Nothing is written under the datasets.

Prints the numbers and writes outputs/bench/confounds.json (docs/audit.md, "Storage confounds by class pair").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import register_configs  # noqa: E402
from pipeline.config.schema import CONF_DIR  # noqa: E402
from pipeline.data.build import build_data  # noqa: E402
from pipeline.data.data_audit import audit_dataset  # noqa: E402
from pipeline.data.folder import SplitLayout, load_imagefolder  # noqa: E402
from pipeline.data.shortcuts import find_confounds, find_shortcuts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def records_of(data) -> tuple[list[dict], list[int]]:
    used = [(p, y) for s in (data.train, data.val, data.test) if s is not None for p, y in zip(s.paths, s.labels)]
    return [data.files[p] for p, _ in used], [y for _, y in used]


def summary_of(found: dict) -> dict:
    pairs = found["pairs"]
    return {"skill": found["classifier"].get("skill"), "flagged": found["flagged"], "tests": pairs["tests"],
            "largest": {a: [v["separation"], v["classes"]] for a, v in pairs["largest"].items()},
            "found": pairs["found"]}


def shared(names: list[str], audit) -> tuple[dict, dict]:
    out, kept = {}, {}
    for name in names:
        cfg = config([f"dataset={name}", "dataset.audit_workers=2"])
        data, _ = build_data(cfg.dataset, seed=cfg.seed)
        recs, labels = records_of(data)
        found = find_shortcuts(recs, labels, data.classes, threshold=audit.shortcut_threshold, folds=audit.folds,
                               seed=0, pair_separation=audit.pair_separation, pair_min_images=audit.pair_min_images)
        out[name] = {"images": len(recs), "classes": len(data.classes), **summary_of(found)}
        kept[name] = (recs, labels, data.classes)
        print(f"{name}: {len(recs)} images, skill {out[name]['skill']}, pairs found {len(found['pairs']['found'])}")
        for a, (sep, cls) in out[name]["largest"].items():
            print(f"    {a:20s} largest pair separation {sep:.3f} {cls}")
    return out, kept


def subsampled(kept: dict, audit, draws: int, seed: int = 0) -> dict:
    rng, out = np.random.default_rng(seed), {}
    for name, (recs, labels, classes) in kept.items():
        y = np.asarray(labels)
        for n in (30, 50, 100):
            if np.bincount(y).min() < n:
                continue
            hits, top = 0, 0.0
            for _ in range(draws):
                idx = np.concatenate([rng.choice(np.flatnonzero(y == k), n, replace=False)
                                      for k in range(len(classes))])
                res = find_confounds([recs[i] for i in idx], [int(y[i]) for i in idx], classes,
                                     separation=audit.pair_separation, min_images=audit.pair_min_images)
                hits += bool(res["found"])
                top = max(top, max(v["separation"] for v in res["largest"].values()))
            out[f"{name} n={n}"] = {"draws": draws, "draws_with_a_warning": hits, "largest_separation": round(top, 4)}
            print(f"{name}, {n} per class: {hits}/{draws} draws warn; largest pair separation {top:.3f}")
    return out


def save(im: Image.Image, path: Path, mode: str = "RGB", quality: int = 90, side: int | None = None) -> None:
    """One storage pipeline: colour mode, JPEG quality (4:2:0 for RGB) and, when given, the short side."""
    if side:
        scale = side / min(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"subsampling": "4:2:0"} if mode == "RGB" else {}
    im.convert(mode).save(path, format="JPEG", quality=quality, **extra)


def write_set(out: Path, sources: dict[str, list[Path]], pipelines: dict[str, list[tuple[float, dict]]],
              seed: int = 0) -> None:
    """Each class's photos saved by its pipelines: [(share, save kwargs)], each file drawn by share."""
    rng = np.random.default_rng(seed)
    for cls, paths in sources.items():
        shares = np.array([s for s, _ in pipelines[cls]])
        for k, src in enumerate(paths):
            kwargs = pipelines[cls][int(rng.choice(len(shares), p=shares / shares.sum()))][1]
            with Image.open(src) as im:
                save(im, out / "train" / cls / f"{k}.jpg", **kwargs)


def constructed(datasets: Path, audit, limit: int) -> dict:
    flowers, chest = datasets / "flowers/train", datasets / "chest_xray/train"
    rgb, grey = {"mode": "RGB"}, {"mode": "L"}
    cases = {
        "greyscale vs RGB JPEG (flowers daisy / tulips)":
            (flowers, {"daisy": [(1, rgb)], "tulips": [(1, grey)]}),
        "issue-like 4 classes: 99% RGB, 88% L, two mixed 50/50 (flowers)":
            (flowers, {"daisy": [(0.99, rgb), (0.01, grey)], "dandelion": [(0.12, rgb), (0.88, grey)],
                       "roses": [(0.5, rgb), (0.5, grey)], "tulips": [(0.5, rgb), (0.5, grey)]}),
        "issue-like 2 classes: NORMAL 88% L, PNEUMONIA 99% RGB (chest_xray)":
            (chest, {"NORMAL": [(0.88, {"mode": "L", "quality": 75}), (0.12, {"mode": "RGB", "quality": 75})],
                     "PNEUMONIA": [(0.99, {"mode": "RGB", "quality": 75}), (0.01, {"mode": "L", "quality": 75})]}),
        "short side 112 vs 224 px (flowers daisy / tulips)":
            (flowers, {"daisy": [(1, {"side": 112})], "tulips": [(1, {"side": 224})]}),
        "JPEG quality 70 vs 95 (flowers daisy / tulips)":
            (flowers, {"daisy": [(1, {"quality": 70})], "tulips": [(1, {"quality": 95})]}),
        "weak mix, must not warn: 70% vs 30% L (flowers daisy / tulips)":
            (flowers, {"daisy": [(0.7, grey), (0.3, rgb)], "tulips": [(0.3, grey), (0.7, rgb)]}),
        "small classes, must not warn: 20 per class, greyscale vs RGB":
            (flowers, {"daisy": [(1, rgb)], "tulips": [(1, grey)]}),
    }
    out = {}
    for title, (root, pipelines) in cases.items():
        n = 20 if title.startswith("small") else limit
        with tempfile.TemporaryDirectory(prefix="confound_") as tmp:
            start = time.time()
            write_set(Path(tmp), {c: sorted((root / c).glob("*"))[:n or None] for c in pipelines}, pipelines)
            data = load_imagefolder(Path(tmp), SplitLayout(val_fraction=0.2), workers=2)
            report = audit_dataset(data, root=tmp, checks=audit, seed=0)
        found = report["shortcuts"]
        lines = [w for w in report["warnings"] if w.startswith(("CONFOUND", "SHORTCUT"))]
        out[title] = {"images": report["summary"]["images"], **summary_of(found), "warnings": lines,
                      "seconds": round(time.time() - start, 1)}
        print(f"\n{title}: {out[title]['images']} images, skill {out[title]['skill']}, "
              f"pairs found {len(found['pairs']['found'])}")
        for a, (sep, cls) in out[title]["largest"].items():
            print(f"    {a:20s} largest pair separation {sep:.3f} {cls}")
        for line in lines:
            print("   ", line)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="digits,hymenoptera,flowers,chest_xray")
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--limit", type=int, default=0, help="images per class of the constructed sets (0: all)")
    p.add_argument("--skip-constructed", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("DATASETS_DIR", str(ROOT.parent / "shared" / "datasets"))
    register_configs()
    audit = config([]).audit
    print(f"thresholds: pair_separation {audit.pair_separation}, pair_min_images {audit.pair_min_images}\n")
    result = {"thresholds": {"pair_separation": audit.pair_separation, "pair_min_images": audit.pair_min_images,
                             "shortcut_threshold": audit.shortcut_threshold}}
    result["shared"], kept = shared(args.datasets.split(","), audit)
    print()
    result["subsampled"] = subsampled(kept, audit, args.draws)
    if not args.skip_constructed:
        result["constructed"] = constructed(Path(os.environ["DATASETS_DIR"]), audit, args.limit)
    out = ROOT / "outputs/bench/confounds.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nWrote {out}")


if __name__ == "__main__":
    main()
