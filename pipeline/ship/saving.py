"""Export a finished run to a shippable dir (entry point: pipeline/export.py, `make export RUN=<run dir>`).

Writes `model.safetensors` (weights only), `model.json` (arch, classes, preprocessing, metrics, training
config, package versions, sha256 of every model file, parity results), `model.onnx` (dynamic batch axis),
`model.ts` (TorchScript: script, else trace) and `MODEL_CARD.md`. A run trained with `trainer.tta` /
`trainer.calibrate` has `tta` and `temperature` in best.json: model.json carries them, `pipeline.load` applies
them, the ONNX and TorchScript files hold them (model/calibrated.py); model.safetensors keeps the plain
model's weights. Every format is compared with the PyTorch checkpoint (with its TTA and temperature) on real
preprocessed images from the run's dataset, at two batch sizes; a max abs logit diff above
`export.tolerance` fails the export and leaves no export dir behind. `export.int8` adds `model_int8.onnx`, a
statically quantized copy of model.onnx kept only where it scores within `export.int8_max_drop` of it on val
(ship/int8.py).
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import fields, replace
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from pipeline.config import CONF_DIR, ExportConfig, check_group
from pipeline.data.images import DEFAULT_MAX_PIXELS
from pipeline.errors import ConfigError, MissingFileError, PipelineError
from pipeline.model import calibrated, checkpoint, ood
from pipeline.runtime import owned
from pipeline.runtime.files import staged_dir, write_json, write_text
from pipeline.ship import int8, loading, model_card
from pipeline.ship.batch_predict import collect_images

_logger = logging.getLogger(__name__)

FILES = {"safetensors": "model.safetensors", "onnx": "model.onnx", "torchscript": "model.ts"}


class ExportError(PipelineError):
    """An export format that cannot be written, or whose outputs differ from the PyTorch model."""


def resolve_settings(run_config: dict, overrides: dict) -> dict:
    """Export settings: the run's `export` config group (conf/export/default.yaml when the run predates it),
    then `overrides` (export.* on the command line); checked against the schema before any work."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "export" / "default.yaml"))
    base = {**defaults, **(run_config.get("export") or {})}  # a run older than a setting: its default
    settings = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(settings) - {f.name for f in fields(ExportConfig)})
    if unknown:
        known = ", ".join(f"export.{f.name}" for f in fields(ExportConfig))
        raise ConfigError(f"export has no setting(s) {unknown}; it takes {known}")
    check_group("export", ExportConfig, settings)
    if not isinstance(settings["int8"], bool):
        raise ConfigError(f"export.int8={settings['int8']!r} is not true or false")
    formats = list(dict.fromkeys(["safetensors", *settings["formats"]]))  # the loader always needs safetensors
    return {**settings, "formats": formats, "tolerance": float(settings["tolerance"]),
            "int8_max_drop": float(settings["int8_max_drop"])}


def dataset_splits(run_dir: Path, dataset: dict, seed: int):
    """The run's dataset splits exactly as training used them: its `split.csv`, or (runs that predate it) the
    dataset re-listed with the run's own `dataset` settings and seed (same fractions, file checks)."""
    from pipeline.data.folder import SplitLayout, load_imagefolder

    hint = "run from the directory you trained in, or pass images=<folder of images>"
    layout = SplitLayout(train_split=dataset["train_split"], val_split=dataset["val_split"],
                         test_split=dataset["test_split"], val_fraction=dataset["val_fraction"],
                         test_fraction=dataset.get("test_fraction", 0.0))
    common = dict(seed=seed, max_pixels=dataset["max_pixels"], min_per_class=dataset["min_per_class"],
                  workers=dataset["audit_workers"])
    if (run_dir / "split.csv").is_file():
        try:
            return load_imagefolder(run_dir, replace(layout, manifest=str(run_dir / "split.csv")),
                                    **common)
        except MissingFileError as e:
            raise MissingFileError(f"{e}; the run's images are not here: {hint}") from None
    root = Path(dataset["root"])
    if not (root / dataset["train_split"]).is_dir():
        raise MissingFileError(f"Dataset root {root} of this run is not here (relative paths are relative to the "
                               f"directory you trained in): {hint}")
    return load_imagefolder(root, layout, **common)


def parity_images(run_dir: Path, dataset: dict, splits, *, images: str | None, n: int) -> tuple[list[str], dict]:
    """Up to `n` real images for the parity check (the val split of the run's `splits`, classes interleaved, or
    those under `images`) and dataset facts."""
    if images:
        paths = collect_images([images])[0]
        if not paths:
            raise MissingFileError(f"No image files under images={images}")
        return paths[:n], {"parity_source": f"images={images}"}
    by_class = [[p for p, y in zip(splits.val.paths, splits.val.labels) if y == c] for c in range(len(splits.classes))]
    interleaved = [p for row in zip_longest(*by_class) for p in row if p is not None]
    split_names = {"train": splits.train, "val": splits.val, **({"test": splits.test} if splits.test else {})}
    where = run_dir / "split.csv" if (run_dir / "split.csv").is_file() else dataset["root"]
    facts = {"parity_source": f"val split of {where} ({splits.val_source})",
             "counts": {name: s.counts() for name, s in split_names.items()},
             "skipped_files": len(splits.skipped), "val_source": splits.val_source}
    return interleaved[:n], facts


def reference_batch(paths: list[str], preprocessing: dict, max_pixels: int) -> tuple[torch.Tensor, list[str]]:
    """Images preprocessed by the training-time path (data.ImageDataset + augment.build_eval_transform)."""
    from pipeline.data.augment import build_eval_transform
    from pipeline.data.folder import ImageDataset, Split

    dataset = ImageDataset(Split(list(paths), [0] * len(paths), ["?"]), build_eval_transform(preprocessing),
                           max_pixels)
    items = [(dataset[i], p) for i, p in enumerate(paths)]
    kept = [(item[0], p) for item, p in items if item is not None]
    if not kept:
        raise ExportError(f"None of the {len(paths)} parity images could be read; pass images=<folder>")
    return torch.stack([x for x, _ in kept]), [p for _, p in kept]


def compare(name: str, refs: list[torch.Tensor], outs: list[torch.Tensor]) -> dict:
    """Max abs logit diff and top-1 agreement of `outs` against the PyTorch `refs`, per batch size."""
    diffs = [float((r - o.float()).abs().max()) for r, o in zip(refs, outs)]
    agree = float(np.mean(np.concatenate([(r.argmax(1) == o.argmax(1)).numpy() for r, o in zip(refs, outs)])))
    result = {"max_abs_diff": max(diffs), "top1_agreement": agree, "batch_sizes": [len(r) for r in refs],
              "max_abs_diff_per_batch": diffs}
    _logger.info("parity %-11s max abs logit diff %.3g, top-1 agreement %.3f (batch sizes %s)", name,
                 result["max_abs_diff"], agree, result["batch_sizes"])
    return result


def compare_scores(name: str, refs: list[torch.Tensor], outs: list[torch.Tensor]) -> dict:
    """Max relative diff of the OOD scores (a squared distance: hundreds, so relative) against the PyTorch `refs`."""
    diff = max(float(((r - o.float()).abs() / r.abs().clamp_min(1.0)).max()) for r, o in zip(refs, outs))
    _logger.info("parity %-11s ood score max relative diff %.3g", name, diff)
    return {"ood_score_max_rel_diff": diff}


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> dict:
    """torch.onnx.export (TorchScript-based exporter; no extra deps) with a dynamic batch axis; onnx.checker. A
    ScoredClassifier (model/ood.py) gets a second output, `ood_score`."""
    import onnx

    outputs = ["logits", "ood_score"] if isinstance(model, ood.ScoredClassifier) else ["logits"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning and tracer warnings
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                              output_names=outputs, opset_version=opset,
                              dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}})
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - exporter errors come in many types
        raise ExportError(f"ONNX export of {type(model).__name__} failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}); drop onnx from export.formats") from None
    return {"file": path.name, "opset": opset, "input_name": "input", "output_name": "logits",
            **({"ood_output_name": "ood_score"} if len(outputs) > 1 else {}),
            "input_shape": ["batch", *example.shape[1:]], "exporter": "torch.onnx (TorchScript-based, dynamo=False)"}


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> dict:
    """torch.jit.script, falling back to torch.jit.trace; {'method': ...} or {'skipped': reason}."""
    errors = []
    for method in ("script", "trace"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ts = torch.jit.script(model) if method == "script" else torch.jit.trace(model, example)
                torch.jit.save(ts, str(path))
            return {"file": path.name, "method": method}
        except Exception as e:  # noqa: BLE001
            errors.append(f"{method}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    _logger.warning("TorchScript export skipped, the model neither scripts nor traces (%s)", "; ".join(errors))
    return {"skipped": "; ".join(errors)}


def two_batch_sizes(x: torch.Tensor) -> list[torch.Tensor]:
    """The batch and its first image (or the image twice): a dynamic batch axis must handle both."""
    return [x, x[:1]] if len(x) > 1 else [x, x.repeat(2, 1, 1, 1)]


def check_formats(model: torch.nn.Module, tmp: Path, paths: list[str], ref_x: torch.Tensor, settings: dict) -> dict:
    """Write the non-safetensors formats into `tmp` and compare every format with the PyTorch model (`model` a
    ScoredClassifier: its logits and its OOD scores)."""
    batches = two_batch_sizes(ref_x)
    scored = isinstance(model, ood.ScoredClassifier)
    with torch.inference_mode():
        outs = [model(b) for b in batches]
    refs = [(o[0] if scored else o).float() for o in outs]
    ref_scores = [o[1].float() for o in outs] if scored else None
    loaded = loading.load(tmp)  # the user's path: model.json + model.safetensors, its own preprocessing
    x = torch.stack([loaded.preprocess(p) for p in paths])
    if not torch.equal(x, ref_x):
        raise ExportError(f"pipeline.load preprocessing differs from training's eval transform "
                          f"(max diff {float((x - ref_x).abs().max()):.3g})")
    runs = {"safetensors": [loaded.logits_and_scores(b) for b in two_batch_sizes(x)]}
    if "onnx" in settings["formats"]:
        results_onnx = export_onnx(model, batches[0][:2], tmp / FILES["onnx"], settings["opset"])
        session = loading.OnnxModel(tmp / FILES["onnx"])
        runs["onnx"] = [session.scored(b) for b in batches]
    results = {"parity": {}, **({"onnx": results_onnx} if "onnx" in runs else {})}
    if "torchscript" in settings["formats"]:
        results["torchscript"] = export_torchscript(model, batches[0][:2], tmp / FILES["torchscript"])
        if "method" in results["torchscript"]:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript
                ts = torch.jit.load(str(tmp / FILES["torchscript"]), map_location="cpu")
                runs["torchscript"] = [ts(b) if scored else (ts(b), None) for b in batches]
    for name, run in runs.items():
        results["parity"][name] = compare(name, refs, [logits for logits, _ in run])
        if scored:
            results["parity"][name].update(compare_scores(name, ref_scores, [score for _, score in run]))
    tol = settings["tolerance"]
    failed = {f: r["max_abs_diff"] for f, r in results["parity"].items() if not r["max_abs_diff"] <= tol}
    failed.update({f"{f} ood score (relative)": r["ood_score_max_rel_diff"] for f, r in results["parity"].items()
                   if not r.get("ood_score_max_rel_diff", 0.0) <= tol})
    if failed:
        raise ExportError(f"Parity check failed: max abs logit diff {failed} above tolerance {tol:g} "
                          f"on {len(paths)} images; raise export.tolerance only if the gap is expected, or drop the "
                          "format")
    return results


def run_splits(run_dir: Path, dataset: dict, seed: int, *, needed: bool, wanted: bool):
    """The run's splits (`dataset_splits`) where the parity check `needed` them or the int8 check `wanted`
    them (None where only wanted and the run's images are not here: the int8 check says so)."""
    if not (needed or wanted):
        return None
    try:
        return dataset_splits(run_dir, dataset, seed)
    except MissingFileError:
        if needed:
            raise
        return None


def int8_model(tmp: Path, splits, preprocessing: dict, settings: dict, max_pixels: int, seed: int) -> dict:
    """model.json `int8` (ship/int8.py): quantize model.onnx on the run's train images, check it on its val ones."""
    if "onnx" not in settings["formats"]:
        return {"kept": False, "why": "export.int8 quantizes model.onnx: add onnx to export.formats"}
    if splits is None or not len(splits.val):
        return {"kept": False, "why": "the run's labelled val images are not here to check the int8 model on "
                                      "(run from the directory you trained in)"}
    calibration, _ = reference_batch(int8.sample(splits.train.paths, settings["int8_calibration_images"], seed),
                                     preprocessing, max_pixels)
    label_of = dict(zip(splits.val.paths, splits.val.labels))
    check_x, kept = reference_batch(int8.sample(splits.val.paths, settings["int8_check_images"], seed),
                                    preprocessing, max_pixels)
    return int8.export_int8(tmp, tmp / FILES["onnx"], calibration.numpy(), check_x.numpy(),
                            np.array([label_of[p] for p in kept]), settings["int8_max_drop"])


EXPORT_FIX = "out={out} would be replaced by the export: choose another out=... (a new or empty dir, or an earlier export)"


def check_out_dir(run_dir: Path, out_dir: str | Path | None) -> Path:
    """The export dir; an existing one must be empty or an earlier export (marked by the pipeline: runtime/owned.py),
    since it will be replaced. Checked before any work, and again by `staged_dir` when the new export is done."""
    out = Path(out_dir) if out_dir else run_dir / "export"
    owned.check_replaceable(out, "export", EXPORT_FIX.format(out=out))
    return out


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, *, checkpoint_name: str = "best",
               images: str | None = None, **overrides) -> Path:
    """Export `run_dir`'s checkpoint (see module docstring). `overrides`: formats, opset, tolerance, parity_images."""
    run_dir = Path(run_dir)
    if not (run_dir / f"{checkpoint_name}.json").is_file():
        raise MissingFileError(f"{run_dir} has no {checkpoint_name}.json/.safetensors: pass a finished run dir "
                               "(outputs/runs/<date>_<dataset>)")
    plain, meta = checkpoint.load_checkpoint(run_dir, checkpoint_name)
    model = calibrated.wrap_for_inference(plain, meta, str(run_dir / f"{checkpoint_name}.json"))  # TTA, temperature
    weights_file = run_dir / f"{checkpoint_name}.safetensors"
    score = ood.score_module(meta.get(ood.KEY), ood.split_weights(checkpoint.read_weights(weights_file))[1],
                             str(weights_file))  # the unknown-image rule (trainer.ood): every format computes it
    if score is not None:
        model = ood.ScoredClassifier(model, score).eval()  # eval: the ONNX exporter restores the mode it finds
    config = meta.get("config") or {}
    settings = resolve_settings(config, overrides)
    max_pixels = (config.get("dataset") or {}).get("max_pixels", DEFAULT_MAX_PIXELS)
    splits = run_splits(run_dir, config.get("dataset") or {}, config.get("seed"),
                        needed=not images, wanted=settings["int8"] and "onnx" in settings["formats"])
    paths, facts = parity_images(run_dir, config.get("dataset") or {}, splits, images=images,
                                 n=int(settings["parity_images"]))
    ref_x, paths = reference_batch(paths, meta["preprocessing"], max_pixels)
    out = check_out_dir(run_dir, out_dir)
    with staged_dir(out, kind="export", fix=EXPORT_FIX.format(out=out)) as tmp:  # complete, or not at all
        weights = {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}
        if score is not None:
            weights.update(ood.prefixed({k: v.contiguous() for k, v in score.state_dict().items()}))
        save_file(weights, str(tmp / FILES["safetensors"]), metadata={"arch": meta["arch"]})
        os.chmod(tmp / FILES["safetensors"], 0o644)  # safetensors writes 0600; a shipped file is world-readable
        rebuild = (*checkpoint.REQUIRED_KEYS, *checkpoint.ARCH_KEYS, *calibrated.META_KEYS, ood.KEY)
        base = {k: meta[k] for k in rebuild if k in meta}
        write_json(tmp / "model.json", base)
        results = check_formats(model, tmp, paths, ref_x, settings)
        if settings["int8"]:
            results["int8"] = int8_model(tmp, splits, meta["preprocessing"], settings, max_pixels,
                                         config.get("seed") or 0)
        written = {f: tmp / name for f, name in {**FILES, "int8": int8.INT8_FILE}.items() if (tmp / name).is_file()}
        doc = model_card.model_json(meta, run_dir, checkpoint_name, settings, results, facts, written)
        images_copied = model_card.copy_figures(run_dir, tmp)
        write_text(tmp / "MODEL_CARD.md", model_card.render(doc, images_copied))
        write_json(tmp / "model.json", doc)
    _logger.info("Exported %s -> %s (%s)", run_dir, out, ", ".join(sorted(doc["files"])))
    return out
