"""Near-duplicate leakage: val/test images whose content nearly equals an image of an earlier split.

A resized, re-encoded or re-saved copy has other bytes, so the exact check (data/data_audit.py, sha1) misses it,
yet the model has seen it. Every probe record carries a 256-bit perceptual hash of the probe's draft
decode (data/images.py `perceptual_hash`: made in the same threaded read as the sha1, so this module reads
nothing). Pairs whose hashes differ in at most `audit.near_duplicate_distance` bits are listed; measured on
the shared datasets, a half-size JPEG-60 copy is within 12 bits of its original, while distinct chest X-rays,
the most alike images there, are 54 or more bits apart. Byte-identical pairs stay the exact check's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.folder import DatasetSplits

SPLIT_ORDER = ("train", "val", "test")
CHUNK_BYTES = 32 * 2**20  # XOR block held at once while comparing hashes


def _hash_rows(hexes: list[str]) -> np.ndarray:
    """Hex hashes as rows of uint64 words (one row per hash)."""
    raw = b"".join(bytes.fromhex(h) for h in hexes)
    return np.frombuffer(raw, dtype=np.uint64).reshape(len(hexes), -1) if hexes else np.zeros((0, 1), np.uint64)


def hamming_pairs(query: list[str], reference: list[str], max_distance: int) -> list[tuple[int, int, int]]:
    """(query index, reference index, distance) of every pair within `max_distance` bits, in blocks of rows."""
    q, r = _hash_rows(query), _hash_rows(reference)
    if not len(q) or not len(r):
        return []
    rows = max(1, CHUNK_BYTES // (r.nbytes or 1))
    found = []
    for start in range(0, len(q), rows):
        dist = np.bitwise_count(q[start:start + rows, None, :] ^ r[None, :, :]).sum(axis=2)
        for i, j in zip(*np.nonzero(dist <= max_distance)):
            found.append((start + int(i), int(j), int(dist[i, j])))
    return found


def _members(data: DatasetSplits, name: str) -> list[dict]:
    split = getattr(data, name)
    if split is None:
        return []
    return [{"split": name, "class": "|".join(split.label_names(y)), "path": p}
            for p, y in zip(split.paths, split.labels)
            if data.files.get(p, {}).get("phash")]


def find_near_duplicates(data: DatasetSplits, max_distance: int) -> list[dict]:
    """Pairs (earlier split first: train-val, train-test, val-test) within `max_distance` bits that are not
    byte-identical, closest first: {"distance", "same_class", "files": [earlier, later]}."""
    earlier: list[dict] = []
    pairs = []
    for name in SPLIT_ORDER:
        members = _members(data, name)
        if name != "train":
            phash = lambda ms: [data.files[m["path"]]["phash"] for m in ms]
            for i, j, d in hamming_pairs(phash(members), phash(earlier), max_distance):
                a, b = earlier[j], members[i]
                if data.files[a["path"]]["sha1"] != data.files[b["path"]]["sha1"]:
                    pairs.append({"distance": d, "same_class": a["class"] == b["class"], "files": [a, b]})
        earlier += members
    return sorted(pairs, key=lambda p: (p["distance"], p["files"][1]["path"]))


def near_leaked_eval_files(pairs: list[dict]) -> set[str]:
    """The val/test member of every pair (the copy the model would be scored on after training on the other)."""
    return {p["files"][1]["path"] for p in pairs}


def near_duplicate_markdown(result: dict, max_listed: int) -> list[str]:
    """The near-duplicate part of the audit section: the closest pairs, then a pointer to the rest."""
    pairs = result["pairs"]
    lines = [f"**Near-duplicates across splits (perceptual hash within {result['max_distance']} of 256 bits, not "
             f"byte-identical): {len(pairs)} pair(s)**" + (" (`near_duplicates.png`)" if pairs else ""), ""]
    for p in pairs[:max_listed]:
        a, b = p["files"]
        lines.append(f"- {p['distance']} bits: `{a['split']}/{a['class']}/{Path(a['path']).name}` ~ "
                     f"`{b['split']}/{b['class']}/{Path(b['path']).name}`"
                     + ("" if p["same_class"] else " (different labels)"))
    if len(pairs) > max_listed:
        lines.append(f"- ... {len(pairs) - max_listed} more in audit.json")
    return lines + [""]
