"""The GPU check (issue 19): one table of what the pipeline does on one NVIDIA GPU, in under 8 minutes.

    bench/gpu_check.sh [--data DIR] [--steps N]        # a machine with CUDA
    bench/gpu_check.sh --device cpu --smoke            # the same code paths on the CPU, tiny sizes (tests the script)

Without CUDA (and without `--device cpu`) it prints "gpu_check: no CUDA, skipped" and runs the CPU-safe part:
the device-decode and device tests (their CUDA cases skip), so CI can call it. With CUDA it prints one markdown
table, row by row as each check ends, and writes it to outputs/gpu_check/gpu_check.json:

| check | value | reference | ratio | note |

  cuda tests              pytest of the device tests with their CUDA cases (passed / failed)
  train step bf16+CL      pipeline fine-tune img/s (train(cfg), amp=bf16, channels_last) / bare timm step, same options
  train step fp32         the same with amp=off, channels_last off
  extraction              pipeline feature extraction img/s (dataset.decode=cpu, then gpu) / bare forward
  decode parity           max and mean abs difference of device-decoded inputs against the CPU path (<= tolerance)
  loader (N workers)      train DataLoader img/s with N = 2, 4, 8 workers / the bf16 training step
  fine-tune               1 epoch, strategy=finetune: val accuracy, seconds
  cached extraction       strategy=linear_probe (cached path): val accuracy, seconds
  torchrun                1 process under torchrun: an all_reduce with the nccl backend, and pipeline.train
  peak memory             torch.cuda.max_memory_allocated over the checks (GB)

The data must be on the machine: copy a dataset into a git-ignored folder first, e.g.
`cp -r ../shared/datasets/hymenoptera data/gpu_check/` (the default `--data`).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = "tf_efficientnet_lite0"
CPU_SAFE_TESTS = ["tests/data/test_device_decode.py", "tests/runtime/test_devices.py"]


def run_tests(paths: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True)
    return proc.returncode, (proc.stdout.strip().splitlines() or [""])[-1]


def bare_step(device, size: int, batch: int, steps: int, bf16: bool, channels_last: bool) -> float:
    """img/s of a bare timm training step (AdamW) on synthetic tensors."""
    import timm
    import torch

    model = timm.create_model(ARCH, num_classes=5).to(device).train()
    x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 5, (batch,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return timed(step, steps, batch, device)


def timed(step, steps: int, batch: int, device) -> float:
    import torch

    step()  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - start)


def bare_forward(device, size: int, batch: int, steps: int) -> float:
    import timm
    import torch

    model = timm.create_model(ARCH, num_classes=0).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)

    def step():
        with torch.inference_mode():
            model(x)
    return timed(step, steps, batch, device)


def compose(overrides: list[str]):
    from pipeline.config import compose_config
    return compose_config(overrides)


def run_train(a, tmp: Path, *extra: str) -> dict:
    """train(cfg) on the check's dataset; returns metrics."""
    from pipeline.train import train

    return train(compose(["dataset=folder", f"dataset.root={a.data}", f"backbone.input_size={a.size}",
                          f"trainer.batch_size={a.batch}", "trainer.progress=false", f"trainer.device={a.device}",
                          f"output_dir={tmp}", f"data_dir={tmp / 'data'}", *extra]))


def pipeline_extraction(a, device, decode: str) -> float:
    from pipeline.data import augment
    from pipeline.data.build import build_data
    from pipeline.features.cache import Extraction, load_or_extract
    from pipeline.model import backbone

    cfg = compose(["dataset=folder", f"dataset.root={a.data}"])
    splits, _ = build_data(cfg.dataset, seed=cfg.seed)
    model, _ = backbone.build_backbone(name=ARCH, num_classes=len(splits.classes), weights="none")
    data_cfg = backbone.data_config(model, a.size)
    model.to(device)
    how = Extraction(device, None, batch_size=a.batch, num_workers=4 if device.type == "cuda" else 0,
                     device_preprocessing=data_cfg if decode == "gpu" else None)
    out = load_or_extract(model, splits.train, augment.build_eval_transform(data_cfg), how,
                          key_parts={"decode": decode})
    return float(out["img_per_s"])


def decode_parity(a, device) -> tuple[float, float]:
    import torch

    from pipeline.data import device_decode
    from pipeline.data.augment import build_eval_transform
    from pipeline.data.folder import Split, find_classes, list_split
    from pipeline.data.images import load_rgb

    root = Path(a.data) / "val" if (Path(a.data) / "val").is_dir() else Path(a.data)
    classes = find_classes(root)
    paths, labels, _ = list_split(root, classes)
    paths, labels = paths[:64], labels[:64]
    prep = {"input_size": [3, a.size, a.size], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
            "crop_pct": 0.875}
    got = torch.cat([x.cpu() for x, _ in device_decode.DeviceBatches(Split(paths, labels, classes), prep, device,
                                                                       32, max_pixels=10**9)])
    tf = build_eval_transform(prep)
    want = torch.stack([tf(image=load_rgb(p))["image"] for p in paths])
    diff = (got - want).abs()
    return float(diff.max()), float(diff.mean())


def loader_rate(a, workers: int) -> float:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_data import loader_epoch

    from pipeline.data import augment
    from pipeline.data.build import build_data

    cfg = compose(["dataset=folder", f"dataset.root={a.data}"])
    splits, _ = build_data(cfg.dataset, seed=cfg.seed)
    data_cfg = {"input_size": [3, a.size, a.size], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                "crop_pct": 0.875}
    return loader_epoch(splits.train, augment.build_train_transform(data_cfg), None, workers, a.batch)


ALL_REDUCE = """import torch, torch.distributed as dist
cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
t = torch.ones(1, device="cuda" if cuda else "cpu")
dist.all_reduce(t)
print("backend", dist.get_backend(), "sum", t.item())
dist.destroy_process_group()
"""


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def torchrun_checks(a, tmp: Path) -> tuple[str, str]:
    """(collective: backend and all_reduce result, or the error; pipeline.train under torchrun: its exit code)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "all_reduce.py").write_text(ALL_REDUCE)
    proc = torchrun([str(tmp / "all_reduce.py")])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("backend")]
    collective = lines[-1] if proc.returncode == 0 and lines else f"exit {proc.returncode}"
    train = torchrun(["-m", "pipeline.train", "dataset=folder", f"dataset.root={a.data}", "trainer=smoke",
                      f"output_dir={tmp / 'run'}", f"data_dir={tmp / 'data'}", f"trainer.device={a.device}"])
    return collective, f"exit {train.returncode}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data/gpu_check/hymenoptera"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check the script itself (e.g. on the CPU)")
    a = ap.parse_args()
    import torch

    from pipeline.runtime.process import tune_allocator
    tune_allocator()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA, skipped (CPU-safe part: the device-decode and device tests)")
        code, last = run_tests(CPU_SAFE_TESTS)
        print(f"gpu_check: CPU-safe tests: {last}")
        return code
    if a.smoke:
        a.steps, a.size, a.batch = 2, 64, 8
    if not Path(a.data).is_dir():
        print(f"gpu_check: no data at {a.data}: copy a dataset there first "
              "(cp -r ../shared/datasets/hymenoptera data/gpu_check/)", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    out = ROOT / "outputs/gpu_check"
    rows: list[dict] = []

    def row(check: str, value, reference=None, note: str = "") -> None:
        ratio = value / reference if isinstance(value, float) and reference else None
        rows.append({"check": check, "value": value, "reference": reference, "ratio": ratio, "note": note})
        fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))
        print(f"| {check} | {fmt(value)} | {fmt(reference)} | {fmt(ratio)} | {note} |", flush=True)

    print(f"gpu_check on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {a.data}\n")
    print("| check | value | reference | ratio | note |\n|---|---|---|---|---|")
    code, last = run_tests(CPU_SAFE_TESTS)
    row("cuda tests", last, note="exit 0" if code == 0 else f"exit {code}")
    for name, bf16, cl, amp in (("train step bf16+CL", True, True, "bf16"), ("train step fp32", False, False, "off")):
        bare = bare_step(device, a.size, a.batch, a.steps, bf16 and device.type == "cuda", cl)
        m = run_train(a, out / name.replace(" ", "_"), "strategy=finetune", "trainer.epochs=1",
                      f"trainer.max_train_batches={a.steps + 2}", f"trainer.amp={amp}", f"trainer.channels_last={cl}")
        row(name, float(m["history"][0]["train_img_per_s"]), bare, "pipeline / bare, img/s")
    forward = bare_forward(device, a.size, a.batch, a.steps)
    for decode in ("cpu", "gpu"):
        row(f"extraction (decode={decode})", pipeline_extraction(a, device, decode), forward, "/ bare forward")
    mx, mean = decode_parity(a, device)
    from pipeline.data.device_decode import MEAN_TOLERANCE, PARITY_TOLERANCE
    ok = mx <= PARITY_TOLERANCE and mean <= MEAN_TOLERANCE
    row("decode parity (max, mean)", round(mx, 4), note=f"mean {mean:.4f}; tolerance {PARITY_TOLERANCE} / "
        f"{MEAN_TOLERANCE}: {'ok' if ok else 'ABOVE'}")
    step = rows[1]["reference"]
    for workers in ((2, 4, 8) if not a.smoke else (2,)):
        row(f"loader ({workers} workers)", float(loader_rate(a, workers)), step, "/ bf16 train step")
    start = time.perf_counter()
    m = run_train(a, out / "finetune", "strategy=finetune", "trainer.epochs=1")
    row("fine-tune, 1 epoch: val acc", round(m["val"]["accuracy"], 4), note=f"{time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    decode = "gpu" if device.type == "cuda" else "cpu"
    m = run_train(a, out / "cached", "strategy=linear_probe", f"dataset.decode={decode}")
    row("cached extraction: val acc", round(m["val"]["accuracy"], 4), note=f"{time.perf_counter() - start:.0f} s")
    collective, train_exit = torchrun_checks(a, out / "torchrun")
    row("torchrun all_reduce, 1 process", collective, note="nccl on CUDA, gloo on the CPU")
    row("pipeline.train under torchrun, 1 process", train_exit)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    row("peak GPU memory (GB)", float(peak))
    from pipeline.runtime.files import write_json
    write_json(out / "gpu_check.json", {"rows": rows, "device": str(device), "data": a.data})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
