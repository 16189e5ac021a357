"""The int8 ONNX model of an export (`export.int8`): ONNX Runtime static quantization, kept only where it passes.

The fp32 `model.onnx` (its TTA and temperature included) is quantized to `model_int8.onnx`: QDQ format, the
convolutions in int8 (weights per output channel, activations whose ranges come from MinMax calibration on
`export.int8_calibration_images` training images: a seeded sample, the eval preprocessing), the classifier head
and element-wise ops in fp32 (`QUANTIZED_OPS`). Then both models predict
up to `export.int8_check_images` val images: the int8 file is kept only where its balanced accuracy is at most
`export.int8_max_drop` points below the fp32 model's. model.json `int8` records the top-1 agreement, both scores,
the drop and whether the file was kept (and why not); `pipeline.load(..., backend="onnx-int8")` and
`make predict BACKEND=onnx-int8` run it.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.training.metrics import classification_metrics

_logger = logging.getLogger(__name__)

INT8_FILE = "model_int8.onnx"
# Only the convolutions (nearly all the compute) run in int8; the head and the element-wise ops stay fp32. Quantizing
# the pooled features too gave a linear probe (lite0, tiny colour folder) one output for every image: agreement 0.33
# with fp32, against 1.0 with the convolutions alone.
QUANTIZED_OPS = ("Conv",)
FORMAT = ("QDQ: convolutions in int8 (per-channel 7-bit weights, MinMax-calibrated activations), head and element-wise "
          "in fp32")
CALIBRATION_BATCH = 16


def quantize(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """`out` := `fp32` statically quantized (module doc), calibrated on the preprocessed images `calibration`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calibration[i:i + CALIBRATION_BATCH]}
                                 for i in range(0, len(calibration), CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    prepared = out.with_name(out.stem + ".prepared.onnx")  # shapes inferred and graph optimized first, as advised
    try:
        try:
            quant_pre_process(str(fp32), str(prepared))
        except Exception:  # noqa: BLE001 - "Incomplete symbolic shape inference" (a fine-tuned digits model):
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # ONNX's own shape inference
        quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        reduce_range=True,  # 7-bit weights: 8-bit products saturate on CPUs without VNNI
                        op_types_to_quantize=list(QUANTIZED_OPS))
    finally:
        prepared.unlink(missing_ok=True)


def compare(fp32_logits: np.ndarray, int8_logits: np.ndarray, labels: np.ndarray, max_drop: float) -> dict:
    """The int8 model against the fp32 one on the same labelled images: agreement, scores, drop, verdict."""
    fp32_pred, int8_pred = fp32_logits.argmax(1), int8_logits.argmax(1)
    scores = {name: {k: metrics[k] for k in ("accuracy", "balanced_accuracy")}
              for name, pred in (("fp32", fp32_pred), ("int8", int8_pred))
              for metrics in [classification_metrics(labels, pred, fp32_logits.shape[1])]}
    drop = 100 * (scores["fp32"]["balanced_accuracy"] - scores["int8"]["balanced_accuracy"])
    kept = drop <= max_drop
    return {"images": len(labels), "top1_agreement": float(np.mean(fp32_pred == int8_pred)), "val": scores,
            "drop_points": round(drop, 3), "max_drop_points": max_drop, "kept": kept,
            **({} if kept else {"why": f"balanced accuracy {drop:.2f} points below fp32 on {len(labels)} val images "
                                       f"(> export.int8_max_drop={max_drop})"})}


def sample(items: list, n: int, seed: int) -> list:
    """Up to `n` of `items`, a seeded sample in the items' order."""
    if len(items) <= n:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def export_int8(tmp: Path, fp32: Path, calibration: np.ndarray, check_x: np.ndarray, check_labels: np.ndarray,
                max_drop: float) -> dict:
    """Quantize `fp32` into `tmp/INT8_FILE`, compare it on (`check_x`, `check_labels`) and remove it unless kept;
    model.json's `int8` record."""
    from pipeline.ship.loading import OnnxModel

    out = tmp / INT8_FILE
    try:
        quantize(fp32, out, calibration)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors: the fp32 export stands, the int8 file is not made
        out.unlink(missing_ok=True)
        why = f"quantization failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        _logger.warning("int8 ONNX not written: %s", why)
        return {"kept": False, "why": why}
    sessions = [OnnxModel(path) for path in (fp32, out)]
    logits = [np.concatenate([session(torch.from_numpy(check_x[i:i + 32])).numpy()
                              for i in range(0, len(check_x), 32)]) for session in sessions]
    record = {"file": INT8_FILE, "calibration_images": len(calibration), "format": FORMAT,
              **compare(*logits, check_labels, max_drop)}
    _logger.info("int8 ONNX: top-1 agreement %.3f with fp32 on %d val images, balanced accuracy %.4f -> %.4f (%+.2f "
                 "points): %s", record["top1_agreement"], record["images"], record["val"]["fp32"]["balanced_accuracy"],
                 record["val"]["int8"]["balanced_accuracy"], -record["drop_points"],
                 "kept" if record["kept"] else f"not kept ({record['why']})")
    if not record["kept"]:
        out.unlink()
        record.pop("file")
    return record
