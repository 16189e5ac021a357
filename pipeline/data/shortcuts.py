"""Shortcut check: does the way a file is stored give its label away?

A model learns whatever separates the classes. When one class was collected as greyscale JPEGs and another
as RGB PNGs, or from a camera that writes EXIF, or at another size or JPEG quality, the storage alone
predicts the label, and val/test (stored the same way) cannot tell. From the probe records the data stage
already made (data/images.py: mode, format, size, `storage_facts`), this module tabulates each storage
attribute per class and cross-validates a classifier that sees the metadata only: its balanced accuracy far
above chance means a shortcut. A confound between two classes of many moves that classifier little, so each
attribute is also compared class pair by class pair (`find_confounds`): a pair it separates strongly, with
enough images behind it, is a `CONFOUND` warning of its own. Nothing is read from disk here.
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


# --- class pairs (find_confounds) -------------------------------------------------------------------------------
PAIR_ALPHA = 0.05  # family-wise: the chance that any pair x attribute of a dataset warns by sampling noise alone
PAIR_CATEGORICAL = ("colour mode", "format", "chroma subsampling", "EXIF")
# Numeric attributes are compared as numbers, not in bins (a bin edge splits a 250 vs 260 px difference and
# hides a 260 vs 500 px one): on this scale, values within the tolerance of each other count as alike.
PAIR_NUMERIC = {"JPEG quality": 5.0,           # quality points (JPEG files only; libjpeg's 1-100 scale)
                "short side": math.log(1.25),  # log px: a quarter larger
                "aspect": math.log(1.1)}       # log(width / height): the landscape/square edge of the tables
MAX_THRESHOLDS = 512  # candidate thresholds of a numeric attribute (its distinct values, else quantiles)
MAX_CONFOUND_LINES = 3  # class pairs with a warning line of their own; the rest are counted (audit.json has all)


def _pair_value(record: dict, name: str) -> float:
    if name == "JPEG quality":
        return math.nan if record.get("quality") is None else float(record["quality"])
    w, h = max(1, record["width"]), max(1, record["height"])
    return math.log(min(w, h)) if name == "short side" else math.log(w / h)


def _shown(name: str, value: str) -> str:
    return {"EXIF": {"yes": "with EXIF", "no": "no EXIF"},
            "chroma subsampling": {"none": "one channel", "n/a": "not JPEG"}}.get(name, {}).get(value, value)


def _threshold_text(name: str, x: float) -> str:
    return {"JPEG quality": f"quality {x:.0f}", "short side": f"{math.exp(x):.0f} px"}.get(
        name, f"{math.exp(x):.2f} w/h")


def _cdf(x: np.ndarray, y: np.ndarray, k: int, at: np.ndarray) -> np.ndarray:
    """(k, len(at)): the share of each class's values <= each threshold."""
    idx = np.searchsorted(at, x, side="left")  # x <= at[t] exactly when idx <= t
    counts = np.bincount(y * (len(at) + 1) + idx, minlength=k * (len(at) + 1)).reshape(k, -1)[:, :-1]
    return np.cumsum(counts, axis=1) / np.bincount(y, minlength=k)[:, None]


def _categorical_pairs(codes: np.ndarray, y: np.ndarray, k: int, values: list[str], name: str):
    """Total-variation distance of every class pair (i < j): the largest share of i's files whose values j has
    fewer of; yields (i, j's, distances, describe(i, j) -> (share_i, text_i, share_j, text_j))."""
    share = np.bincount(y * len(values) + codes, minlength=k * len(values)).reshape(k, -1).astype(np.float64)
    share /= share.sum(axis=1, keepdims=True)

    def describe(i: int, j: int) -> tuple:
        more = share[i] > share[j]  # i's side; tv = share_i(more) + share_j(rest) - 1
        side = [(np.flatnonzero(m), s) for m, s in ((more, share[i]), (~more, share[j]))]
        out = []
        for idx, s in side:
            idx = idx[np.argsort(-s[idx])]
            shown = [_shown(name, values[v]) for v in idx if s[v] > 0]
            out += [float(s[idx].sum()), " or ".join(shown[:2]) + (" or other" if len(shown) > 2 else "")]
        return tuple(out)

    for i in range(k - 1):
        yield i, np.arange(i + 1, k), 0.5 * np.abs(share[i] - share[i + 1:]).sum(axis=1), describe


def _numeric_pairs(x: np.ndarray, y: np.ndarray, k: int, tolerance: float, name: str):
    """Tolerant two-sample Kolmogorov-Smirnov distance of every class pair: the largest share of one class at or
    below a threshold t less the share of the other at or below t + tolerance (either way round); 0 when every
    value of each class has a value of the other within the tolerance. Yields like `_categorical_pairs`."""
    at = np.unique(x)
    if len(at) > MAX_THRESHOLDS:
        at = np.unique(np.quantile(x, np.linspace(0, 1, MAX_THRESHOLDS)))
    low, high = _cdf(x, y, k, at), _cdf(x, y, k, at + tolerance)

    def describe(i: int, j: int) -> tuple:
        below, above = low[i] - high[j], low[j] - high[i]  # i lower than j / j lower than i
        lo, hi = (i, j) if below.max() >= above.max() else (j, i)
        t = int(np.argmax(low[lo] - high[hi]))
        texts = [(float(low[lo, t]), f"<= {_threshold_text(name, at[t])}"),
                 (float(1 - high[hi, t]), f"> {_threshold_text(name, at[t] + tolerance)}")]
        (si, ti), (sj, tj) = texts if lo == i else texts[::-1]
        return si, ti, sj, tj

    for i in range(k - 1):
        down = (low[i] - high[i + 1:]).max(axis=1)
        up = (low[i + 1:] - high[i]).max(axis=1)
        yield i, np.arange(i + 1, k), np.maximum(down, up), describe


def find_confounds(records: list[dict], labels: list[int], classes: list[str], *, separation: float,
                   min_images: int) -> dict:
    """Every class pair x storage attribute: its separation (categorical: total-variation distance; numeric:
    tolerant KS distance, `_numeric_pairs`), both 0 when the pair is stored alike and 1 when no file of one is
    stored like a file of the other. `found`: the pairs with `min_images` files or more in each class whose
    separation reaches `separation` and whose lower confidence bound is above 0 (a Hoeffding bound per class,
    union over the value sets (2^values) or DKW for the thresholds, Bonferroni over every pair x attribute
    tested at family-wise PAIR_ALPHA), so that small classes cannot warn by chance. `largest`: the strongest
    pair of each attribute, warned or not."""
    y_all = np.asarray(labels, dtype=np.int64)
    attrs = [storage_attributes(r) for r in records]
    columns = {}
    for name in PAIR_CATEGORICAL:
        raw = [a[name] for a in attrs]
        values = sorted(set(raw))
        code = {v: c for c, v in enumerate(values)}
        columns[name] = ("categorical", np.array([code[v] for v in raw], dtype=np.int64), values)
    for name in PAIR_NUMERIC:
        columns[name] = ("numeric", np.array([_pair_value(r, name) for r in records], dtype=np.float64), None)
    kept = {}  # attribute: (class indices with enough files, mask of its records)
    for name, (kind, col, _) in columns.items():
        has = np.isfinite(col) if kind == "numeric" else np.ones(len(col), bool)
        counts = np.bincount(y_all[has], minlength=len(classes))
        kept[name] = (np.flatnonzero(counts >= min_images), has, counts)
    tests = sum(len(k) * (len(k) - 1) // 2 for k, _, _ in kept.values())
    found, largest = [], {}
    for name, (kind, col, values) in columns.items():
        ok, has, counts = kept[name]
        largest[name] = {"separation": 0.0, "classes": [], "lower_bound": None}
        if len(ok) < 2:
            continue
        remap = np.full(len(classes), -1)
        remap[ok] = np.arange(len(ok))
        sel = has & (remap[y_all] >= 0)
        y, n = remap[y_all[sel]], counts[ok].astype(np.float64)
        sets = 2.0 if kind == "numeric" else max(2.0, 2.0 ** min(len(values), 60) - 2)  # 60: no float overflow
        log_term = math.log(2 * sets * tests / PAIR_ALPHA)  # two classes' deviations, each within its bound
        margin = np.sqrt(log_term / (2 * n))
        pairs = (_numeric_pairs(col[sel], y, len(ok), PAIR_NUMERIC[name], name) if kind == "numeric"
                 else _categorical_pairs(col[sel], y, len(ok), values, name))
        for i, js, dist, describe in pairs:
            lower = dist - margin[i] - margin[js]
            best = int(np.argmax(dist))
            if not largest[name]["classes"] or dist[best] > largest[name]["separation"]:
                largest[name] = {"separation": round(float(dist[best]), 4),
                                 "classes": [classes[ok[i]], classes[ok[js[best]]]],
                                 "lower_bound": round(float(lower[best]), 4)}
            for m in np.flatnonzero((dist >= separation - 1e-9) & (lower > 0)):  # 1e-9: shares' rounding
                j = int(js[m])
                si, ti, sj, tj = describe(i, j)
                found.append({"classes": [classes[ok[i]], classes[ok[j]]], "attribute": name,
                              "separation": round(float(dist[m]), 4), "lower_bound": round(float(lower[m]), 4),
                              "images": [int(n[i]), int(n[j])], "shares": [round(si, 4), round(sj, 4)],
                              "stored": [ti, tj]})
    found.sort(key=lambda f: (-f["separation"], -min(f["images"])))
    return {"separation": separation, "min_images": min_images, "alpha": PAIR_ALPHA, "tests": tests,
            "largest": largest, "class_pairs": len({tuple(f["classes"]) for f in found}), "found": found}


def _confound_text(f: dict) -> str:
    (a, b), (sa, sb), (ta, tb) = f["classes"], f["shares"], f["stored"]
    return (f"{f['attribute']} separates {a} from {b}: {a} {sa:.0%} {ta}, {b} {sb:.0%} {tb} (separation "
            f"{f['separation']:.2f}, {f['images'][0]} vs {f['images'][1]} images)")


def confound_warnings(result: dict) -> list[str]:
    """One `CONFOUND` line per class pair that a storage attribute separates (`find_confounds`), strongest first,
    naming its other separating attributes; past MAX_CONFOUND_LINES pairs, one line counts the rest."""
    by_pair: dict[tuple, list[dict]] = {}
    for f in result.get("pairs", {}).get("found", []):
        by_pair.setdefault(tuple(f["classes"]), []).append(f)
    lines = []
    for found in list(by_pair.values())[:MAX_CONFOUND_LINES]:
        also = "".join(f"; also {f['attribute']} ({f['separation']:.2f})" for f in found[1:])
        lines.append(f"CONFOUND: {_confound_text(found[0])}{also}. A model can learn the storage instead of the "
                     "content: re-encode these classes alike (same mode, format, subsampling, quality, size) or "
                     "check that deployment images of both are stored the same way")
    if len(by_pair) > MAX_CONFOUND_LINES:
        lines.append(f"CONFOUND: {len(by_pair) - MAX_CONFOUND_LINES} more class pair(s) separated by how they are "
                     "stored (table in audit.md, all in audit.json 'shortcuts' 'pairs')")
    return lines


def find_shortcuts(records: list[dict], labels: list[int], classes: list[str], *, threshold: float, folds: int,
                   seed: int, pair_separation: float, pair_min_images: int) -> dict:
    """Per-class storage distributions, their separation, the metadata-only classifier (see module doc),
    `flagged` when its skill reaches `threshold`, and the class-pair confounds (`find_confounds`)."""
    dist = class_distributions(records, labels, classes)
    x, names = metadata_matrix(records)
    clf = metadata_classifier(x, np.asarray(labels), len(classes), folds, seed)
    sep = {name: round(separation(per_class), 4) for name, per_class in dist.items()}
    pairs = find_confounds(records, labels, classes, separation=pair_separation, min_images=pair_min_images)
    return {"threshold": threshold, "flagged": clf.get("skill", 0.0) >= threshold, "classifier": clf,
            "features": names, "separation": sep, "per_class": dist, "pairs": pairs}


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
    return lines + [""] + (confound_markdown(result["pairs"], max_rows) if "pairs" in result else [])


def confound_markdown(pairs: dict, max_rows: int) -> list[str]:
    """The class-pair part: the rule, the largest pair separation of each attribute, the pairs found."""
    largest = ", ".join(f"{a} {v['separation']:.2f}" for a, v in pairs["largest"].items())
    lines = [f"- class pairs ({pairs['tests']} pair x attribute tests): a CONFOUND where one attribute separates two "
             f"classes by >= {pairs['separation']} with >= {pairs['min_images']} images each (and a family-wise "
             f"{1 - pairs['alpha']:.0%} lower bound > 0); largest pair separation: {largest}", ""]
    if not pairs["found"]:
        return lines
    lines += ["| classes | attribute | stored | separation (lower bound) | images |", "|---|---|---|---|---|"]
    for f in pairs["found"][:max_rows]:
        (a, b), (sa, sb), (ta, tb) = f["classes"], f["shares"], f["stored"]
        lines.append(f"| {a} / {b} | {f['attribute']} | {a} {sa:.0%} {ta}, {b} {sb:.0%} {tb} | "
                     f"{f['separation']:.2f} ({f['lower_bound']:.2f}) | {f['images'][0]} / {f['images'][1]} |")
    if len(pairs["found"]) > max_rows:
        lines.append(f"| ... {len(pairs['found']) - max_rows} more in audit.json | | | | |")
    return lines + [""]
