"""Data-path throughput: decode, augment, DataLoader epochs with/without the decoded-image cache, vs model steps.

    .venv/bin/python bench/bench_data.py --dataset flowers [--limit 0] [--workers 2] [--batch 32] [--size 224]

Everything runs on real files of $DATASETS_DIR/<dataset>/train (default ../shared/datasets).
Prints a markdown table and writes outputs/bench/bench_data_<dataset>.json. Loader and model
rates are measured one after the other (not overlapped), on whatever else the machine is
doing: the load average is recorded with the numbers.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from pipeline.data import (
    augment,
    folder,
    image_cache,  # noqa: E402
)
from pipeline.data.images import DEFAULT_MAX_PIXELS, decode_rgb  # noqa: E402
from pipeline.runtime.process import tune_allocator  # noqa: E402

tune_allocator()  # as the entry points do (runtime/process.py): PyTorch runs 3-5x slower here without it


def rate(n: int, seconds: float) -> float:
    return round(n / max(seconds, 1e-9), 1)


def pil_decode(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as im:
        im.load()
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def bench_decode(paths: list[str]) -> dict:
    """Single-thread decode img/s from bytes in memory: PIL only vs the pipeline's decoder (OpenCV fast path)."""
    blobs = [Path(p).read_bytes() for p in paths]
    out = {}
    for name, fn in (("pil", pil_decode), ("pipeline", decode_rgb), ("pil_again", pil_decode),
                     ("pipeline_again", decode_rgb)):
        start = time.perf_counter()
        for b in blobs:
            fn(b)
        out[name] = rate(len(blobs), time.perf_counter() - start)
    return {"pil": max(out["pil"], out["pil_again"]), "pipeline": max(out["pipeline"], out["pipeline_again"])}


def bench_augment(paths: list[str], data_cfg: dict) -> dict:
    """Single-thread img/s of the light train transform on decoded images (no decode)."""
    images = [decode_rgb(Path(p).read_bytes()) for p in paths[:300]]
    out = {}
    for preset, knobs in (("light", {}), ("heavy", dict(scale_min=0.08, color_jitter=0.4, rotate=20, translate=0.1,
                                                        shear=5, coarse_dropout=0.5, blur=0.1))):
        tf = augment.build_train_transform(data_cfg, augment.TrainAugment(preset=preset, **knobs))
        start = time.perf_counter()
        for img in images:
            tf(image=img)
        out[preset] = rate(len(images), time.perf_counter() - start)
    return out


def loader_epoch(split: folder.Split, transform, cache, workers: int, batch: int) -> float:
    ds = folder.ImageDataset(split, transform, cache=cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=folder.collate_skip_none)
    start, seen = time.perf_counter(), 0
    for batch_ in loader:
        seen += len(batch_[1])
    return rate(seen, time.perf_counter() - start)


def bench_loader(split: folder.Split, data_cfg: dict, workers: int, batch: int) -> dict:
    """Epoch img/s of the train DataLoader (light preset) for dataset.cache=none|memory|disk."""
    tf = augment.build_train_transform(data_cfg)
    short = augment.eval_resize_size(data_cfg)
    out = {"none": [loader_epoch(split, tf, None, workers, batch) for _ in range(2)]}
    start = time.perf_counter()
    mem = image_cache.build_cache("memory", paths=split.paths, short_side=short, workers=workers)
    out["memory_fill"] = rate(len(split), time.perf_counter() - start)
    out["memory"] = [loader_epoch(split, tf, mem, workers, batch) for _ in range(2)]
    del mem
    with tempfile.TemporaryDirectory() as tmp:
        disk = image_cache.build_cache("disk", paths=split.paths, short_side=short, cache_dir=tmp)
        out["disk"] = [loader_epoch(split, tf, disk, workers, batch) for _ in range(3)]  # first one fills
    return out


def bench_model(size: int, batch: int, steps: int) -> dict:
    """Training-step img/s of tf_efficientnet_lite0 (random init: same FLOPs): full fine-tune and head only."""
    out = {}
    for mode in ("finetune", "head_only"):
        model = timm.create_model("tf_efficientnet_lite0", num_classes=5)
        if mode == "head_only":
            for p in model.parameters():
                p.requires_grad = False
            for p in model.get_classifier().parameters():
                p.requires_grad = True
            model.eval()  # frozen BN
        else:
            model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 5, (batch,))
        for i in range(steps + 1):
            if i == 1:
                start = time.perf_counter()  # step 0 is warm-up
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[mode] = rate(steps * batch, time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="flowers")
    ap.add_argument("--limit", type=int, default=0, help="use at most N train images (0 = all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--model-steps", type=int, default=3)
    args = ap.parse_args()
    root = Path(os.environ.get("DATASETS_DIR", "../shared/datasets")) / args.dataset / "train"
    classes = folder.find_classes(root)
    paths, labels, _ = folder.list_split(root, classes)
    if args.limit:
        keep = sorted(random.Random(0).sample(range(len(paths)), min(args.limit, len(paths))))
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    bad = folder.check_decodable(paths, max_pixels=DEFAULT_MAX_PIXELS)
    good = [i for i, p in enumerate(paths) if p not in bad]
    split = folder.Split([paths[i] for i in good], [labels[i] for i in good], classes)
    data_cfg = {**timm.data.resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0")),
                "input_size": [3, args.size, args.size]}
    torch.set_num_threads(os.cpu_count() or 1)
    result = {"dataset": args.dataset, "images": len(split), "workers": args.workers, "batch": args.batch,
              "size": args.size, "cpus": os.cpu_count(), "load_avg_before": os.getloadavg()[0]}
    result["decode_1thread"] = bench_decode(split.paths[:400])
    result["augment_1thread"] = bench_augment(split.paths, data_cfg)
    result["loader_epoch"] = bench_loader(split, data_cfg, args.workers, args.batch)
    result["model_step"] = bench_model(args.size, args.batch, args.model_steps)
    result["load_avg_after"] = os.getloadavg()[0]
    print_table(result)
    out = Path("outputs/bench") / f"bench_data_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nWrote {out}")


def print_table(r: dict) -> None:
    le, ms = r["loader_epoch"], r["model_step"]
    print(f"\n{r['dataset']}: {r['images']} train images, {r['workers']} workers, batch {r['batch']}, "
          f"{r['size']} px, {r['cpus']} CPUs, load avg {r['load_avg_before']:.1f} -> {r['load_avg_after']:.1f}\n")
    print("| measurement | img/s |\n|---|---|")
    print(f"| decode, PIL only (1 thread) | {r['decode_1thread']['pil']} |")
    print(f"| decode, pipeline (OpenCV fast path, 1 thread) | {r['decode_1thread']['pipeline']} |")
    for k, v in r["augment_1thread"].items():
        print(f"| augment {k} preset, decoded input (1 thread) | {v} |")
    print(f"| loader epoch, cache=none (epochs 1, 2) | {le['none'][0]}, {le['none'][1]} |")
    print(f"| memory cache fill (threads) | {le['memory_fill']} |")
    print(f"| loader epoch, cache=memory (epochs 1, 2) | {le['memory'][0]}, {le['memory'][1]} |")
    print(f"| loader epoch, cache=disk (cold, warm, warm) | {', '.join(map(str, le['disk']))} |")
    print(f"| model train step, full fine-tune | {ms['finetune']} |")
    print(f"| model train step, head only (frozen BN) | {ms['head_only']} |")
    best = max(le["memory"] + le["disk"][1:] + le["none"])
    print(f"\nloader/fine-tune ratio: uncached {min(le['none']) / ms['finetune']:.1f}x, best cached "
          f"{best / ms['finetune']:.1f}x; vs head-only: uncached {min(le['none']) / ms['head_only']:.1f}x")


if __name__ == "__main__":
    main()
