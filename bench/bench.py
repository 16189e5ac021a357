"""`make bench`: the pipeline's speed and memory against bare-PyTorch ceilings, measured in one run.

    .venv/bin/python bench/bench.py [--dataset hymenoptera] [--size 224] [--batch 32] [--steps 10]

Every measurement runs in its own subprocess (fresh allocator state, its own peak RSS, no warm caches
from another part) on the same arch, batch, resolution and threads:

  1. train:     pipeline fine-tune img/s on real images (train(cfg), strategy=finetune) vs a bare timm
                training step on synthetic tensors                                 target >= 0.9
  2. inference: pipeline feature extraction img/s (the cached-probe path, its default workers and memory
                format) vs a bare forward in the same memory format              target >= 0.9
  3. loader:    DataLoader img/s (decode + light augment, 2 workers; without and with the decoded-image
                cache) vs the fine-tune step rate                                   target >= 3x
  4. memory:    peak RSS of the fine-tune run vs the bare training step            target <= 1.5x
  5. allocator: bare forward with the glibc allocator fix vs without (expect 3-5x on these VMs)
  6. partial:   a top-3-group partial fine-tune epoch (train(cfg), strategy=partial, freeze depth n-3) on
                activations cached at the freeze boundary vs on images      target >= 3x (epochs 2-3);
                and the whole 3-epoch run, the cache's passes included
  7. int8:      ONNX Runtime img/s of the export's int8 model (ship/int8.py) vs the fp32 ONNX model, at batch 1
                (latency) and at --batch (throughput), both in one process                 target > 1
  plus speed options on the bare step: channels_last, bf16 autocast, fused/foreach AdamW.

Data: $DATASETS_DIR/<dataset> (default ../shared/datasets), else the embedded digits set.
Prints a table and writes outputs/bench/bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = "tf_efficientnet_lite0"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_steps(step, steps: int, batch: int) -> float:
    """img/s over `steps` calls of `step` after one warm-up call."""
    for _ in range(1):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def part_train_step(a) -> dict:
    """Bare training step on synthetic tensors. Variants: plain (contiguous, torch's default AdamW), default
    (the pipeline's defaults: channels_last), channels_last, fused, foreach_off, bf16, compile (channels_last +
    torch.compile, as trainer.compile=true does; its first step, the compilation, is timed apart)."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=5).train()
    x, y = torch.randn(a.batch, 3, a.size, a.size), torch.randint(0, 5, (a.batch,))
    if a.variant in ("channels_last", "default", "compile"):
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if a.variant == "compile":
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", f"{a.tmp}/inductor")  # cold cache: full compile time
        model.compile()
    opt_kwargs = {"foreach": False} if a.variant == "foreach_off" else \
        {"fused": True} if a.variant == "fused" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **opt_kwargs)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.variant == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    steps = max(1, a.steps // 5) if a.variant == "bf16" else a.steps  # bf16 autocast is very slow without AMX
    first = time.perf_counter()
    step()
    first = time.perf_counter() - first
    return {"img_per_s": timed_steps(step, steps, a.batch), "first_step_s": first}


def part_forward(a) -> dict:
    """Bare inference forward (eval, inference_mode) on synthetic tensors."""
    import timm
    import torch

    model = timm.create_model(ARCH, num_classes=0).eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    if a.variant == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode():
            model(x)
    return {"img_per_s": timed_steps(step, a.steps, a.batch)}


def _overrides(a, *extra: str) -> list[str]:
    return [*a.dataset_overrides, f"backbone.input_size={a.size}", f"trainer.batch_size={a.batch}",
            "trainer.progress=false", "trainer.num_workers=2", f"output_dir={a.tmp}/run", f"data_dir={a.tmp}/data",
            f"backbone.cache_dir={ROOT / 'data' / 'weights'}", *extra]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def part_pipeline_finetune(a) -> dict:
    """train(cfg) fine-tuning 3 epochs of up to `steps` + 2 batches of real images: the engine's img/s (every step,
    the wait for data and each epoch's start included). Epochs 2-3 are the steady state a run spends its epochs
    in; epoch 1 also carries the model's warm-up (first steps), which the bare step leaves out."""
    from pipeline.train import train

    cfg = _compose(_overrides(a, "strategy=finetune", "trainer.epochs=3", f"trainer.max_train_batches={a.steps + 2}"))
    first, *steady = train(cfg)["history"]
    return {"img_per_s": sum(h["train_images"] for h in steady) / sum(h["train_seconds"] for h in steady),
            "first_epoch_img_per_s": first["train_img_per_s"]}


def part_pipeline_partial(a) -> dict:
    """train(cfg) fine-tuning the top 3 layer groups for 3 epochs of up to `steps` + 2 batches: `--variant boundary`
    on cached boundary activations (trainer.boundary_cache=always, its default views), else on images."""
    import timm

    from pipeline.model import freezing
    from pipeline.train import train

    depth = len(freezing.layer_groups(timm.create_model(ARCH))) - 3
    cache = "always" if a.variant == "boundary" else "never"
    cfg = _compose(_overrides(a, "strategy=partial", f"strategy.freeze_depth={depth}", "trainer.epochs=3",
                              f"trainer.max_train_batches={a.steps + 2}", f"trainer.boundary_cache={cache}",
                              "trainer.time_limit=null"))
    start = time.perf_counter()
    first, *steady = train(cfg)["history"]
    return {"img_per_s": sum(h["train_images"] for h in steady) / sum(h["train_seconds"] for h in steady),
            "first_epoch_img_per_s": first["train_img_per_s"], "run_s": time.perf_counter() - start,
            "freeze_depth": depth}


def part_pipeline_extract(a) -> dict:
    """The cached-probe extraction (features/cache.py load_or_extract, no disk cache) over up to 320 train images,
    with the pipeline's extraction settings (features.num_workers, features.channels_last)."""
    import torch

    from pipeline.data import augment
    from pipeline.data.build import build_data
    from pipeline.data.folder import Split
    from pipeline.features.cache import Extraction, load_or_extract
    from pipeline.features.cached_fit import extraction_workers
    from pipeline.model import backbone

    cfg = _compose(_overrides(a))
    splits, _ = build_data(cfg.dataset, seed=cfg.seed)
    n = min(len(splits.train), 320)
    split = Split(splits.train.paths[:n], splits.train.labels[:n], splits.classes)
    model, _ = backbone.build_backbone(name=ARCH, num_classes=len(splits.classes), weights="none")
    tf = augment.build_eval_transform(backbone.data_config(model, a.size))
    cpu, f = torch.device("cpu"), cfg.features
    workers = extraction_workers(f.num_workers, cfg.trainer.num_workers, cpu)
    how = Extraction(cpu, None, batch_size=64, num_workers=workers, channels_last=f.channels_last)
    out = load_or_extract(model, split, tf, how, key_parts={})
    return {"img_per_s": out["img_per_s"], "images": n, "workers": workers, "channels_last": bool(f.channels_last)}


def part_loader(a) -> dict:
    """Train DataLoader epoch img/s (light augment, 2 workers): no cache, then the memory cache's 2nd epoch."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_data import loader_epoch

    from pipeline.data import augment, image_cache
    from pipeline.data.build import build_data

    cfg = _compose(_overrides(a))
    splits, _ = build_data(cfg.dataset, seed=cfg.seed)
    data_cfg = {"input_size": [3, a.size, a.size], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                "crop_pct": 0.875}
    tf = augment.build_train_transform(data_cfg)
    plain = loader_epoch(splits.train, tf, None, 2, a.batch)
    mem = image_cache.build_cache("memory", paths=splits.train.paths, short_side=augment.eval_resize_size(data_cfg),
                                  workers=2)
    loader_epoch(splits.train, tf, mem, 2, a.batch)
    return {"no_cache": plain, "memory_cache": loader_epoch(splits.train, tf, mem, 2, a.batch)}


def part_onnx_int8(a) -> dict:
    """ONNX Runtime, fp32 `model.onnx` vs the export's int8 model (ship/int8.py: static QDQ, per-channel),
    quantized from it in this process: img/s at batch 1 and at `a.batch`, each after a warm-up call."""
    import timm
    import torch

    from pipeline.ship.int8 import quantize
    from pipeline.ship.loading import OnnxModel
    from pipeline.ship.saving import export_onnx

    model = timm.create_model(ARCH, num_classes=10).eval()
    fp32, int8 = Path(a.tmp) / "bench_fp32.onnx", Path(a.tmp) / "bench_int8.onnx"
    export_onnx(model, torch.randn(2, 3, a.size, a.size), fp32, 17)
    quantize(fp32, int8, torch.randn(32, 3, a.size, a.size).numpy())
    out = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        session = OnnxModel(path)
        for batch in (1, a.batch):
            x = torch.randn(batch, 3, a.size, a.size)
            out[f"{name}_b{batch}_img_per_s"] = timed_steps(lambda: session(x), max(a.steps, 20 // batch), batch)
    return {**out, "batch": a.batch}


PARTS = {"train_step": part_train_step, "forward": part_forward, "pipeline_finetune": part_pipeline_finetune,
         "pipeline_partial": part_pipeline_partial,
         "pipeline_extract": part_pipeline_extract, "loader": part_loader, "onnx_int8": part_onnx_int8}


def run_part(a, part: str, variant: str = "plain", allocator: bool = True) -> dict:
    """Run one part in a fresh interpreter; returns its JSON result plus peak RSS and wall time."""
    env = dict(os.environ)
    if not allocator:
        env["PIPELINE_MALLOC_TUNE"] = "0"
        for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
            env.pop(k, None)
    cmd = [sys.executable, __file__, "--part", part, "--variant", variant, "--size", str(a.size), "--batch",
           str(a.batch), "--steps", str(a.steps), "--dataset", a.dataset, "--tmp", a.tmp]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench part {part}/{variant} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"  {part:18s} {variant:14s} {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()})}",
          flush=True)
    return result


def measure(a) -> dict:
    r = {"finetune": run_part(a, "pipeline_finetune"), "train_step": run_part(a, "train_step", "default"),
         "train_step_plain": run_part(a, "train_step")}
    r["extract"], r["forward"] = run_part(a, "pipeline_extract"), run_part(a, "forward")
    r["loader"] = run_part(a, "loader")
    r["partial"], r["partial_boundary"] = run_part(a, "pipeline_partial"), run_part(a, "pipeline_partial", "boundary")
    r["onnx_int8"] = run_part(a, "onnx_int8")
    r["forward_no_allocator_fix"] = run_part(a, "forward", allocator=False)
    r["forward_channels_last"] = run_part(a, "forward", "channels_last")
    for variant in ("channels_last", "fused", "foreach_off", "bf16", "compile"):
        r[f"train_step_{variant}"] = run_part(a, "train_step", variant)
    return r


def table(r: dict) -> list[dict]:
    step = r["train_step"]["img_per_s"]
    plain = r["train_step_plain"]["img_per_s"]
    rows = [("1 train img/s: pipeline fine-tune, epochs 2-3 / bare step (same options)", r["finetune"]["img_per_s"],
             step, ">= 0.95"),
            ("1b train img/s: pipeline fine-tune, epoch 1 (model warm-up) / bare step",
             r["finetune"]["first_epoch_img_per_s"], step, ""),
            ("2 inference img/s: pipeline extraction / bare forward (same memory format)", r["extract"]["img_per_s"],
             r["forward_channels_last" if r["extract"]["channels_last"] else "forward"]["img_per_s"], ">= 0.9"),
            ("3a loader img/s (no cache) / fine-tune step", r["loader"]["no_cache"], step, ">= 3"),
            ("3b loader img/s (memory cache) / fine-tune step", r["loader"]["memory_cache"], step, ">= 3"),
            ("4 peak RSS MB: fine-tune run / bare step", r["finetune"]["peak_rss_mb"], r["train_step"]["peak_rss_mb"],
             "<= 1.5"),
            ("5 forward img/s: allocator fix on / off", r["forward"]["img_per_s"],
             r["forward_no_allocator_fix"]["img_per_s"], "3-5x here"),
            ("6 partial top-3 epoch img/s: boundary cache / images (epochs 2-3)", r["partial_boundary"]["img_per_s"],
             r["partial"]["img_per_s"], ">= 3"),
            ("6b partial top-3, 3-epoch run s: images / boundary cache (its passes included)", r["partial"]["run_s"],
             r["partial_boundary"]["run_s"], ""),
            ("7a ONNX Runtime img/s at batch 1: int8 / fp32 (export.int8; latency ratio)",
             r["onnx_int8"]["int8_b1_img_per_s"], r["onnx_int8"]["fp32_b1_img_per_s"], "> 1"),
            (f"7b ONNX Runtime img/s at batch {r['onnx_int8'].get('batch', 32)}: int8 / fp32 (throughput)",
             r["onnx_int8"][f"int8_b{r['onnx_int8'].get('batch', 32)}_img_per_s"],
             r["onnx_int8"][f"fp32_b{r['onnx_int8'].get('batch', 32)}_img_per_s"], "> 1"),
            ("forward img/s: channels_last / default", r["forward_channels_last"]["img_per_s"],
             r["forward"]["img_per_s"], "keep if > 1")]
    rows += [(f"train step img/s: {v} / plain fp32", r[f"train_step_{v}"]["img_per_s"], plain, "keep if > 1")
             for v in ("channels_last", "fused", "foreach_off", "bf16")]
    rows.append(("train step img/s: pipeline defaults (channels_last) / plain fp32", step, plain, ""))
    compiled = r["train_step_compile"]
    rows.append((f"train step img/s: compile / channels_last (first step, compiling: {compiled['first_step_s']:.0f} s)",
                 compiled["img_per_s"], r["train_step_channels_last"]["img_per_s"], "keep if > 1"))
    return [{"measure": m, "value": v, "reference": ref, "ratio": v / ref, "target": t} for m, v, ref, t in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="hymenoptera")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--part", choices=sorted(PARTS))
    ap.add_argument("--variant", default="plain")
    ap.add_argument("--tmp", default="")
    a = ap.parse_args()
    os.environ.setdefault("DATASETS_DIR", str(ROOT.parent / "shared" / "datasets"))
    have = (Path(os.environ["DATASETS_DIR"]) / a.dataset / "train").is_dir()
    a.dataset_overrides = [f"dataset={a.dataset}"] if have else ["dataset=digits"]
    if a.part:
        sys.path.insert(0, str(ROOT))
        from pipeline.runtime.process import set_threads, tune_allocator
        tune_allocator()  # off for the allocator-off variant (PIPELINE_MALLOC_TUNE=0)
        set_threads(0)
        result = PARTS[a.part](a)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return
    import tempfile
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        a.tmp = tmp
        print(f"bench: {ARCH} @ {a.size}px, batch {a.batch}, {os.cpu_count()} cpus, data {a.dataset_overrides[0]}")
        raw = measure(a)
    rows = table(raw)
    print("\n| measure | value | reference | ratio | target |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['measure']} | {row['value']:.1f} | {row['reference']:.1f} | {row['ratio']:.2f} | {row['target']} |")
    out = ROOT / "outputs" / "bench" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"rows": rows, "raw": raw, "seconds": time.perf_counter() - start, "load_average": os.getloadavg(),
           "cpus": os.cpu_count(), "args": {k: v for k, v in vars(a).items() if k != "tmp"}}
    out.write_text(json.dumps(doc, indent=2))
    print(f"\n{doc['seconds']:.0f} s; load average {doc['load_average'][0]:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
