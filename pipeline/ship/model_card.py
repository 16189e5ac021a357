"""An export dir's `model.json` document and its human-readable `MODEL_CARD.md` (used by ship/saving.py)."""
from __future__ import annotations

import json
import logging
import math
import platform
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline.model import ensemble, ood
from pipeline.model.calibrated import META_KEYS
from pipeline.model.checkpoint import ARCH_KEYS
from pipeline.ship.loading import file_sha256

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FIGURES = ("confusion_test.png", "confusion_val.png", "curves.png")  # copied from the run dir when present
PACKAGES = ("pipeline", "torch", "timm", "albumentations", "opencv-python-headless", "safetensors", "onnx",
            "onnxruntime", "numpy", "pillow")
METRIC_COLUMNS = (("num_samples", "images"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced acc."),
                  ("macro_f1", "macro F1"), ("loss", "loss"))


def read_json(path: Path) -> dict:
    """A run's JSON side file, or {} when it is absent or unreadable (the card then says less)."""
    try:
        return json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _logger.warning("Ignoring unreadable %s: %s", path, e)
        return {}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def training_facts(meta: dict, run_dir: Path, run_metrics: dict) -> dict:
    """Mode, freeze depth, params and the auto-strategy decision (decision.json) of the run, where recorded."""
    config = meta.get("config") or {}
    facts = {k: run_metrics[k] for k in ("mode", "freeze_depth", "n_groups", "trainable_params", "total_params")
             if k in run_metrics}
    facts.setdefault("mode", (config.get("strategy") or {}).get("mode"))
    facts.update(bn=(config.get("strategy") or {}).get("bn"), weights=(config.get("backbone") or {}).get("weights"),
                 best_epoch=meta.get("epoch"), epochs_run=len(run_metrics.get("history") or []) or None,
                 monitor=run_metrics.get("monitor") or (config.get("trainer") or {}).get("monitor"),
                 decision=read_json(run_dir / "decision.json") or None)
    return facts


def model_json(meta: dict, run_dir: Path, checkpoint_name: str, settings: dict, results: dict, facts: dict,
               files: dict[str, Path]) -> dict:
    """Everything needed to rebuild, check and describe the model (no Python objects: plain JSON); the run's
    metrics.json gives the test metrics and the calibration record."""
    run_metrics = read_json(run_dir / "metrics.json")
    metrics = {"val": meta.get("val_metrics") or run_metrics.get("val")}
    if checkpoint_name == "best" and run_metrics.get("test"):  # train.py evaluates test with the best checkpoint
        metrics["test"] = run_metrics["test"]
    if checkpoint_name == "best":  # leak-free val/test above; these count the leaked files too (data/leaks.py)
        metrics.update({f"{s}_with_leaks": run_metrics[f"{s}_with_leaks"] for s in ("val", "test")
                        if run_metrics.get(f"{s}_with_leaks")})
    config = meta.get("config") or {}
    dataset = config.get("dataset") or {}
    return {
        "format_version": FORMAT_VERSION,
        **{k: meta[k] for k in ("arch", "num_classes", "class_names", "preprocessing")},
        **{k: meta[k] for k in ARCH_KEYS if meta.get(k)},  # multi-depth probe, ensemble
        **{k: meta[k] for k in META_KEYS if k in meta},  # TTA views and temperature: pipeline.load applies them
        **({ood.KEY: meta[ood.KEY]} if meta.get(ood.KEY) else {}),  # the unknown-image rule: load/predict apply it
        **({"calibration": run_metrics["calibration"]} if run_metrics.get("calibration") else {}),
        **{k: run_metrics[k] for k in ("leaks", "storage_invariance") if run_metrics.get(k)},
        "epoch": meta.get("epoch"), "metrics": metrics,
        "training": training_facts(meta, run_dir, run_metrics),
        "dataset": {"name": dataset.get("name"), "root": dataset.get("root"), **facts},
        "source": {"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint_name},
        "export": {k: settings[k] for k in ("formats", "opset", "tolerance", "parity_images", "int8",
                                            "int8_max_drop") if k in settings},
        "parity": results["parity"],
        "onnx": results.get("onnx"), "torchscript": results.get("torchscript"),
        **({"int8": results["int8"]} if results.get("int8") else {}),
        "files": {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files.values()},
        "versions": package_versions(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
    }


def ood_lines(record: dict | None) -> list[str]:
    """The card's paragraph on the "unknown" answer (`trainer.ood`, model/ood.py)."""
    if not record:
        return []
    if "skipped" in record:
        return ["", f"No \"unknown\" answer: {record['skipped']}."]
    return ["", f"Unknown images: an image whose penultimate features have a cosine similarity below "
                f"{record['threshold']:.4g} to their {record['k']}th nearest of {record['train_images']} train images' "
                f"({record['score']} score) is `unknown`; the threshold keeps {100 * record['keep']:.0f}% of "
                f"{record['val_images']} val "
                "images. Every format computes the score (ONNX/TorchScript: a second output, `ood_score`); "
                "`pipeline.load` and `make predict` apply the threshold."]


def copy_figures(run_dir: Path, out_dir: Path) -> list[str]:
    """Copy the run's confusion matrix / curve images (written by training when available)."""
    copied = []
    for name in FIGURES:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out_dir / name)
            copied.append(name)
    return copied


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def model_section(doc: dict) -> list[str]:
    t, p = doc["training"], doc["preprocessing"]
    size = p["input_size"][-1]
    lines = ["## Model", "", f"- architecture: timm `{doc['arch']}`, {doc['num_classes']} classes"
             + (f", {t['total_params']:,} parameters" if t.get("total_params") else ""),
             f"- initial weights: backbone.weights={t.get('weights')}",
             f"- training mode: `{t.get('mode')}`" + (f", {t['freeze_depth']} of {t['n_groups']} layer groups frozen"
                                                      if t.get("n_groups") else "")
             + (f", BN {t['bn']}" if t.get("bn") else "")
             + (f", {t['trainable_params']:,} trainable parameters" if t.get("trainable_params") else ""),
             f"- checkpoint: epoch {t.get('best_epoch')}" + (f" of {t['epochs_run']}" if t.get("epochs_run") else "")
             + (f", best val {t['monitor']}" if t.get("monitor") else "")]
    members = (doc.get(ensemble.KEY) or {}).get("members")
    if members:
        lines.append(f"- an ensemble of {len(members)} models over the same backbone architecture ("
                     + ", ".join(f"{m.get('role', 'member')} at temperature {m['temperature']:.3f}" for m in members)
                     + "): the mean of their probabilities, chosen by a paired test on val; inference runs "
                     f"{len(members)} backbones, {len(members)}x one model's cost")
    d = t.get("decision")
    if d:
        lines.append(f"- decision (strategy.mode=auto): `{d.get('mode')}`, freeze depth {d.get('freeze_depth')}"
                     + (f"; rule: {d['rule']}" if d.get("rule") else "")
                     + (f"; data size {d['size']}" if d.get("size") else ""))
    lines.append(f"- input: RGB, short side resized to floor({size} / crop_pct {p['crop_pct']}) with "
                 f"{p['interpolation']} interpolation, center crop {size}x{size}, normalized with mean {p['mean']}, "
                 f"std {p['std']}" + (" (grayscale replicated to 3 channels)" if p.get("grayscale_input") else ""))
    views, temperature = doc.get("tta") or ["identity"], doc.get("temperature", 1.0)
    if views != ["identity"] or temperature != 1.0:
        lines.append(f"- output: logits averaged over the views {views}, divided by temperature {temperature:.4f}; "
                     "applied by `pipeline.load` and held by the ONNX and TorchScript files")
    return lines + [""]


def data_section(doc: dict) -> list[str]:
    d = doc["dataset"]
    lines = ["## Data", "", f"- dataset: {d.get('name')} (root `{d.get('root')}`)"]
    counts = d.get("counts")
    if not counts:
        return lines + ["- class counts: the dataset was not available at export time (see the run's summary.md)", ""]
    lines += [f"- val split: {d.get('val_source')}", f"- unreadable files skipped: {d.get('skipped_files', 0)}", "",
              "| class | " + " | ".join(counts) + " |", "|---" * (len(counts) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(str(counts[s].get(c, 0)) for s in counts) + " |" for c in doc["class_names"]]
    lines.append("| **total** | " + " | ".join(str(sum(counts[s].values())) for s in counts) + " |")
    return lines + [""]


def metrics_section(doc: dict, figures: list[str]) -> list[str]:
    m = doc["metrics"]
    lines = ["## Metrics", "", "| split | " + " | ".join(c for _, c in METRIC_COLUMNS) + " |",
             "|---" * (len(METRIC_COLUMNS) + 1) + "|"]
    lines += [f"| {_split_label(split, doc)} | " + " | ".join(_fmt(vals.get(k)) for k, _ in METRIC_COLUMNS) + " |"
              for split, vals in m.items() if vals]
    split = "test" if (m.get("test") or {}).get("per_class") else "val"
    per_class = (m.get(split) or {}).get("per_class")
    if per_class:
        lines += ["", f"Per class ({split}):", "", "| class | precision | recall | F1 | images |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c} | {_fmt(v.get('precision'))} | {_fmt(v.get('recall'))} | {_fmt(v.get('f1'))} "
                  f"| {v.get('support', '')} |" for c, v in per_class.items()]
    for name in figures:
        if name.startswith("confusion"):
            split_name = name.removeprefix("confusion_").removesuffix(".png")
            lines += ["", f"Confusion matrix ({split_name}):", "", f"![confusion matrix]({name})"]
    return lines + [""]


def _split_label(key: str, doc: dict) -> str:
    """'val', or 'val (leak-free)' / 'val with its 12 leaked files' where the run set leaked files aside."""
    leaks = doc.get("leaks") or {}
    if key.endswith("_with_leaks"):
        split = key.removesuffix("_with_leaks")
        return f"{split} with its {leaks[split]['leaked']} leaked files"
    return f"{key} (leak-free)" if (leaks.get(key) or {}).get("set_aside") else key


def export_section(doc: dict) -> list[str]:
    e, d = doc["export"], doc["dataset"]
    lines = ["## Export check", "", f"Logits of each format compared with the PyTorch checkpoint on "
             f"{doc['parity']['safetensors']['batch_sizes'][0]} real images ({d.get('parity_source')}), preprocessed "
             f"as above; tolerance {e['tolerance']:g} (max abs logit diff).", "",
             "| format | file | MB | max abs logit diff | top-1 agreement | batch sizes |", "|---|---|---|---|---|---|"]
    names = {"safetensors": "model.safetensors", "onnx": "model.onnx", "torchscript": "model.ts"}
    for fmt, r in doc["parity"].items():
        f = doc["files"].get(names[fmt], {})
        lines.append(f"| {fmt} | `{names[fmt]}` | {f.get('bytes', 0) / 1e6:.1f} | {r['max_abs_diff']:.3g} "
                     f"| {r['top1_agreement']:.3f} | {', '.join(map(str, r['batch_sizes']))} |")
    q = doc.get("int8")
    if q and q.get("val"):
        f = doc["files"].get(q.get("file") or "", {})
        lines += ["", f"int8 ONNX (`export.int8`; {q['format']}, calibrated on {q['calibration_images']} train "
                  f"images), against fp32 ONNX on {q['images']} val images: top-1 agreement {q['top1_agreement']:.3f}, "
                  f"balanced accuracy {q['val']['fp32']['balanced_accuracy']:.4f} -> "
                  f"{q['val']['int8']['balanced_accuracy']:.4f} ({-q['drop_points']:+.2f} points): "
                  + (f"kept as `{q['file']}` ({f.get('bytes', 0) / 1e6:.1f} MB; `BACKEND=onnx-int8`)" if q["kept"]
                     else f"not kept: {q['why']}")]
    elif q:
        lines += ["", f"int8 ONNX not written: {q['why']}"]
    lines += ood_lines(doc.get(ood.KEY))
    if (doc.get("torchscript") or {}).get("skipped"):
        lines += ["", f"TorchScript not exported: {doc['torchscript']['skipped']}"]
    elif doc.get("torchscript"):
        lines += ["", f"TorchScript via `torch.jit.{doc['torchscript']['method']}`."]
    return lines + [""]


def probabilities_line(doc: dict) -> str:
    """What the probabilities are: plain softmax, or with the run's TTA and temperature (and their ECE)."""
    views, temperature = doc.get("tta") or ["identity"], doc.get("temperature", 1.0)
    tta = " of the logits averaged over the image and its mirror image (test-time augmentation)" \
        if "hflip" in views else ""
    if temperature == 1.0:
        return f"- The probabilities are softmax outputs{tta}, not calibrated confidences."
    ece = [f"{split} ECE {r['before']['ece']:.4f} at T = 1 -> {r['after']['ece']:.4f}"
           for split, r in (doc.get("calibration") or {}).items() if split in ("val", "test")]
    return (f"- The probabilities are softmax(logits / T){tta}, with temperature T = {temperature:.4f} fitted on "
            "the val split (temperature scaling)" + (f": {', '.join(ece)}" if ece else "") + ". The val split "
            "chose T, so only a test ECE is an unbiased measure; on other data the confidences may be off again.")


def limitations(doc: dict) -> list[str]:
    """Limitations that follow from this model's own numbers."""
    lines = ["- Closed set: every image gets one of the classes above, including images of something else "
             "entirely; there is no 'unknown' answer.",
             probabilities_line(doc),
             "- Measured only on images from the same source as the training data; other cameras, lighting, "
             "backgrounds or resolutions may score lower."]
    val, test = doc["metrics"].get("val") or {}, doc["metrics"].get("test") or {}
    if test:
        lines.append("- The val split also picked the best epoch, so val numbers are optimistic; the test split is the "
                     "unbiased estimate.")
    else:
        lines.append("- There is no test split: the val split also picked the best epoch, so the numbers above are "
                     "optimistic.")
    leaks = doc.get("leaks") or {}
    held = [f"{leaks[s]['leaked']} {s}" for s in ("val", "test") if (leaks.get(s) or {}).get("set_aside")]
    if held:
        lines.append(f"- {' and '.join(held)} files copy a training (or val) file exactly or nearly ({leaks['exact']} "
                     f"byte-identical, {leaks['near']} near-identical); the leak-free rows leave them out, the rows "
                     "with leaked files count them and are optimistic.")
    inv = doc.get("storage_invariance") or {}
    if inv.get("storages"):
        worst = max(inv["storages"].items(), key=lambda kv: abs(kv[1]["change"]))
        lines.append(f"- Storage: re-encoding {inv['images']} val images ({', '.join(inv['storages'])}) flipped up to "
                     f"{100 * max(r['flipped'] for r in inv['storages'].values()):.1f}% of predictions; the largest "
                     f"change was {100 * worst[1]['change']:+.1f} points of {inv['metric']} ({worst[0]})"
                     + (": beyond the standard error, so the model reads how files are stored; deploy on files "
                        "stored like the training data, or re-encode the classes alike and retrain."
                        if inv["flagged"] else ", within the standard error."))
    ref = test or val
    n, acc = ref.get("num_samples"), ref.get("accuracy")
    if n and acc is not None:
        half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)
        lines.append(f"- {n} {'test' if test else 'val'} images: accuracy {acc:.3f} is uncertain by about "
                     f"+/-{half:.3f} (95% normal interval).")
    train_counts = (doc["dataset"].get("counts") or {}).get("train")
    if train_counts and min(train_counts.values()) > 0 and max(train_counts.values()) / min(train_counts.values()) > 3:
        lines.append(f"- Imbalanced training data ({min(train_counts.values())} to {max(train_counts.values())} images "
                     "per class): rare classes are the least reliable; see the per-class table.")
    size = doc["preprocessing"]["input_size"][-1]
    lines.append(f"- Images are resized to {size}x{size} pixels: details smaller than that scale are lost.")
    return lines


def render(doc: dict, figures: list[str]) -> str:
    """MODEL_CARD.md: model, data, metrics (+ confusion matrix), export check, intended use, limitations."""
    d = doc["dataset"]
    name = d.get("name") if d.get("name") != "folder" else f"{Path(str(d.get('root'))).name} (folder)"
    lines = [f"# Model card: {doc['arch']} fine-tuned on {name}", "",
             f"Exported {doc['exported_at']} from run `{doc['source']['run_dir']}` (checkpoint "
             f"`{doc['source']['checkpoint']}`). Machine-readable: `model.json`.", ""]
    lines += model_section(doc) + data_section(doc) + metrics_section(doc, figures) + export_section(doc)
    lines += ["## Intended use", "", f"Sorting images like those of the `{d.get('name')}` training set into one of "
              f"{doc['num_classes']} classes: {', '.join(doc['class_names'])}.", "", "```python",
              "import pipeline", "m = pipeline.load('<this dir>')             # or backend='onnx' / 'onnx-int8'",
              "print(m.predict(['image.jpg'], topk=3))    # [[(class, probability), ...]]", "```", "",
              "Command line: `make predict RUN=<this dir> IMAGES=<file or folder> [BACKEND=onnx|onnx-int8] [TOPK=3]`.",
              "",
              "## Limitations", ""]
    lines += limitations(doc)
    lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| `{name}` | {f['bytes']} | `{f['sha256'][:16]}...` |" for name, f in doc["files"].items()]
    lines += ["", "Package versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), ""]
    return "\n".join(lines)
