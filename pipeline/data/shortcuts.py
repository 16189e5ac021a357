"""Shortcut check: does the way a file is stored give its label away?

A model learns whatever separates the classes. When one class was collected as greyscale JPEGs and another
as RGB PNGs, or from a camera that writes EXIF, or at another size or JPEG quality, the storage alone
predicts the label, and val/test (stored the same way) cannot tell. From the probe records the data stage
already made (data/images.py: mode, format, size, `storage_facts`), this module tabulates each storage
attribute per class and cross-validates a classifier that sees the metadata only: its balanced accuracy far
above chance means a shortcut. Nothing is read from disk here.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

ATTRIBUTES = ("colour mode", "format", "chroma subsampling", "JPEG quality", "EXIF", "short side", "aspect")
CATEGORICAL = ("mode", "format", "subsampling")  # one-hot columns of the classifier; the rest are numbers
LISTED_VALUES = 2  # values per class cell in the markdown table (audit.json has the full distribution)


def _short_side(record: dict) -> str:
    lo = 2 ** int(math.log2(max(1, min(record["width"], record["height"]))))
    return f"{lo}-{2 * lo - 1} px"


def _aspect(record: dict) -> str:
    ratio = record["width"] / max(1, record["height"])
    return "landscape" if ratio > 1.1 else "portrait" if ratio < 1 / 1.1 else "square"


def storage_attributes(record: dict) -> dict[str, str]:
    """The storage facts of one probe record as categories (the per-class tables)."""
    q = record.get("quality")
    quality = "n/a" if q is None else "100" if q >= 100 else f"{q // 10 * 10}-{q // 10 * 10 + 9}"
    return {"colour mode": str(record.get("mode")), "format": str(record.get("format")),
            "chroma subsampling": record.get("subsampling") or "n/a", "JPEG quality": quality,
            "EXIF": "yes" if record.get("exif") else "no", "short side": _short_side(record),
            "aspect": _aspect(record)}


def class_distributions(records: list[dict], labels: list[int], classes: list[str]) -> dict[str, dict]:
    """{attribute: {class: {value: share}}}, shares of each class's files, most common value first."""
    out: dict[str, dict] = {}
    attrs = [storage_attributes(r) for r in records]
    for name in ATTRIBUTES:
        out[name] = {}
        for k, cls in enumerate(classes):
            counts = Counter(a[name] for a, y in zip(attrs, labels) if y == k)
            total = sum(counts.values()) or 1
            out[name][cls] = {v: round(n / total, 4) for v, n in counts.most_common()}
    return out


def separation(per_class: dict[str, dict]) -> float:
    """Largest total-variation distance between two classes' distributions of one attribute (0: same, 1: no
    value in common)."""
    dists = [d for d in per_class.values() if d]
    return max((0.5 * sum(abs(a.get(v, 0.0) - b.get(v, 0.0)) for v in set(a) | set(b))
                for i, a in enumerate(dists) for b in dists[i + 1:]), default=0.0)


def metadata_matrix(records: list[dict]) -> tuple[np.ndarray, list[str]]:
    """One row per file: one-hot mode/format/subsampling, EXIF, quality (-1: not JPEG), width, height, aspect."""
    values = {key: sorted({str(r.get(key)) for r in records}) for key in CATEGORICAL}
    names = [f"{key}={v}" for key in CATEGORICAL for v in values[key]] + ["exif", "quality", "width", "height",
                                                                         "aspect"]
    rows = [[float(str(r.get(key)) == v) for key in CATEGORICAL for v in values[key]]
            + [float(bool(r.get("exif"))), float(r.get("quality") or -1), float(r["width"]), float(r["height"]),
               r["width"] / max(1, r["height"])] for r in records]
    return np.array(rows, dtype=np.float64).reshape(len(records), len(names)), names


def metadata_classifier(x: np.ndarray, y: np.ndarray, n_classes: int, folds: int, seed: int) -> dict:
    """Stratified K-fold balanced accuracy of a random forest on metadata alone, against chance (1 / classes).
    `skill` rescales it: 0 at chance, 1 when the metadata alone labels every file correctly."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    chance = 1.0 / n_classes
    k = min(folds, int(np.bincount(y, minlength=n_classes).min()))
    if k < 2:
        return {"skipped": f"a class has fewer than 2 images ({folds}-fold CV needs 2 or more per class)"}
    if np.ptp(x, axis=0).max(initial=0.0) == 0:  # every file stored alike: nothing to learn from
        return {"balanced_accuracy": chance, "chance": chance, "skill": 0.0, "folds": k, "constant": True}
    forest = RandomForestClassifier(n_estimators=50, min_samples_leaf=2, class_weight="balanced",
                                    random_state=seed, n_jobs=1)
    pred = cross_val_predict(forest, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    bacc = float(balanced_accuracy_score(y, pred))
    return {"balanced_accuracy": round(bacc, 4), "chance": round(chance, 4),
            "skill": round(max(0.0, (bacc - chance) / (1 - chance)), 4), "folds": k, "constant": False}


def find_shortcuts(records: list[dict], labels: list[int], classes: list[str], *, threshold: float, folds: int,
                   seed: int) -> dict:
    """Per-class storage distributions, their separation, and the metadata-only classifier (see module doc);
    `flagged` when its skill reaches `threshold`."""
    dist = class_distributions(records, labels, classes)
    x, names = metadata_matrix(records)
    clf = metadata_classifier(x, np.asarray(labels), len(classes), folds, seed)
    sep = {name: round(separation(per_class), 4) for name, per_class in dist.items()}
    return {"threshold": threshold, "flagged": clf.get("skill", 0.0) >= threshold, "classifier": clf,
            "features": names, "separation": sep, "per_class": dist}


def telling_attributes(result: dict, n: int = 3) -> list[str]:
    """The attributes that separate the classes most, as text: 'colour mode: NORMAL 91% L, PNEUMONIA 98% RGB'."""
    ranked = sorted(result["separation"].items(), key=lambda kv: -kv[1])
    picked = [name for name, sep in ranked[:n] if sep >= 0.3] or [ranked[0][0]]
    return [f"{name}: " + ", ".join(f"{cls} {_top(d)}" for cls, d in result["per_class"][name].items() if d)
            for name in picked]


def _top(dist: dict[str, float], n: int = 1) -> str:
    return ", ".join(f"{share:.0%} {value}" if share >= 0.005 else f"<1% {value}" for value, share in
                     list(dist.items())[:n])


def shortcut_warning(result: dict) -> list[str]:
    """The warning line when metadata alone predicts the label (empty otherwise)."""
    clf = result["classifier"]
    if not result["flagged"]:
        return []
    return [f"SHORTCUT: metadata alone predicts the label: CV balanced accuracy {clf['balanced_accuracy']:.2f} vs "
            f"chance {clf['chance']:.2f}; " + "; ".join(telling_attributes(result)) + ". A model can learn the storage "
            "instead of the content: re-encode all classes alike (same mode, format, size, quality) or check "
            "that deployment images are stored the same way"]


def shortcut_markdown(result: dict, max_rows: int) -> list[str]:
    """The `### Storage shortcuts` part of the audit section: classifier line and per-class table."""
    clf = result["classifier"]
    if "skipped" in clf:
        head = f"- metadata-only classifier: skipped ({clf['skipped']})"
    else:
        head = (f"- metadata-only classifier ({clf['folds']}-fold CV, random forest on {len(result['features'])} "
                f"storage features): balanced accuracy {clf['balanced_accuracy']:.2f} vs chance {clf['chance']:.2f} "
                f"(skill {clf['skill']:.2f}; warns at {result['threshold']})")
    lines = ["### Storage shortcuts", "", head, "- separation (0: classes stored alike, 1: nothing in common): "
             + ", ".join(f"{k} {v:.2f}" for k, v in result["separation"].items()), ""]
    classes = list(result["per_class"][ATTRIBUTES[0]])
    lines += ["| class | " + " | ".join(ATTRIBUTES) + " |", "|---" * (len(ATTRIBUTES) + 1) + "|"]
    for cls in classes[:max_rows]:
        lines.append(f"| {cls} | " + " | ".join(_top(result["per_class"][a][cls], LISTED_VALUES) for a in ATTRIBUTES)
                     + " |")
    if len(classes) > max_rows:
        lines.append(f"| ... {len(classes) - max_rows} more classes in audit.json |" + " |" * len(ATTRIBUTES))
    return lines + [""]
