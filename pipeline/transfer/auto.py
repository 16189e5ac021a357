"""The `auto` strategy: choose the transfer mode from dataset size and measured similarity.

Size: every class has >= `large_per_class` train images and the total is >= `large_total` -> large.
Similarity to the pretraining domain is measured, not assumed: on a bounded, class-balanced sample we
cross-validate a logistic regression on (a) the frozen pretrained features and (b) raw 16x16 RGB pixels.
The gain (a) - (b) says how much the pretrained representation adds for *this* data. Natural photos gain a
lot (ants/bees: features 0.94 vs pixels 0.24, chance-rescaled); glyphs or X-rays, where pixels already carry
the signal, gain little. Gain >= `similar_gain` -> similar. Then the four classic cases:

    small + similar   -> linear_probe  (features already separate the classes)
    large + similar   -> partial       (stem + first stage stay frozen; the rest adapts)
    small + different -> partial       (shallow unfreeze: only the top `shallow_unfreeze` groups train)
    large + different -> finetune      (everything trains)

Under `trainer.time_limit` (the default) small + similar data also gets a fine-tune after its probe, for the time
left; it replaces the probe only by beating it on val. Where the rule picked a fine-tune, the probe fitted first is
a fallback kept only by beating the fine-tune by `probe_margin_se` val standard errors (probe_bar). Small +
different data trains deeper (all but the first `similar_freeze_depth` groups) where the budget fits
`deep_min_steps` steps at that depth (size_depth_to_budget).
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.data.folder import Split
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.runtime.files import write_json
from pipeline.transfer.separability import cv_separability, measure_separability, sample_per_class

_logger = logging.getLogger(__name__)


def pixel_separability(sample: Split, side: int = 16, seed: int = 0) -> dict:
    """Same CV probe on raw downsampled pixels: the baseline that says how hard the task is without transfer."""
    rows, labels = [], []
    for path, label in zip(sample.paths, sample.labels):
        try:
            image = load_rgb(path)
        except ImageDecodeError:
            continue
        rows.append(cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA).ravel() / 255.0)
        labels.append(label)
    return cv_separability(np.stack(rows), np.asarray(labels), seed)


def size_class(counts: dict[str, int], large_per_class: int, large_total: int) -> dict:
    smallest = min(counts.values())
    total = sum(counts.values())
    return {"min_per_class": smallest, "total": total, "large_per_class": large_per_class,
            "large_total": large_total,
            "size": "large" if smallest >= large_per_class and total >= large_total else "small"}


def choose_mode(size: str, similar: bool, n_groups: int, *, similar_freeze_depth: int,
                shallow_unfreeze: int) -> tuple[str, int, str]:
    """(mode, freeze_depth, rule) for the four size x similarity cases."""
    if size == "small" and similar:
        return "linear_probe", n_groups, "small + similar -> linear probe on frozen features"
    if size == "large" and similar:
        depth = min(similar_freeze_depth, n_groups)
        return "partial", depth, f"large + similar -> fine-tune with the first {depth} generic groups frozen"
    if size == "small":
        depth = max(0, n_groups - shallow_unfreeze)
        return "partial", depth, f"small + different -> shallow unfreeze: top {n_groups - depth} groups train"
    return "finetune", 0, "large + different -> fine-tune all layers"


def spend_budget_on_finetune(decision: dict, similar_freeze_depth: int) -> dict:
    """Under `trainer.time_limit`, small + similar data gets the time left after its probe: auto fits the probe
    (saved as `best`) and then fine-tunes as for large + similar data (the first `similar_freeze_depth` groups
    frozen); an epoch replaces the probe only by beating it on val (features/probe_fallback.py). Without a limit
    the probe alone runs, in seconds. Flowers at 2 minutes, 3 seeds: 86.4 +- 2.0 test balanced accuracy against
    the probe's 86.2 +- 1.0 (README "Measured: time budgets")."""
    if decision["mode"] != "linear_probe":
        return decision
    depth = min(similar_freeze_depth, decision["n_groups"])
    return {**decision, "mode": "partial", "freeze_depth": depth, "rule_mode": "linear_probe",
            "rule": f"{decision['rule']}; under trainer.time_limit the probe comes first, then a fine-tune with the "
                    f"first {depth} generic groups frozen for the time left, kept only where it beats the probe on val"}


def deepens_with_budget(decision: dict, deep_freeze_depth: int) -> bool:
    """small + different data whose shallow unfreeze keeps more than `deep_freeze_depth` groups frozen: under
    `trainer.time_limit` its depth is sized to the budget (size_depth_to_budget)."""
    return (decision["size"] == "small" and not decision["similarity"]["similar"] and decision["mode"] == "partial"
            and min(deep_freeze_depth, decision["n_groups"]) < decision["freeze_depth"])


def probe_bar(decision: dict, probe_val: float, se: float | None, margin_se: float) -> float:
    """The val value a budgeted fine-tune epoch must beat to replace auto's probe. Where the rule picked a
    fine-tune (`rule_mode` absent: small + different, or large data) the probe fitted first is only a fallback
    for a budget too short for the fine-tune to pay, and the rule's choice stands unless val says otherwise:
    the probe's val less `margin_se` of its standard errors (`strategy.auto.probe_margin_se`). Chest_xray (val
    SE about 0.012, test shifted from val) showed why: probes kept at val 0.973-0.980 over fine-tunes at
    0.966-0.976 scored 71-76 on test, the fine-tunes 79-86; one SE was not enough (seed 3: 0.980 vs 0.966).
    Where the rule picked the probe (small + similar) a fine-tune epoch must beat it. `se` None (macro_f1,
    loss: no closed form): the probe's val itself."""
    if se is None or decision.get("rule_mode") == "linear_probe":
        return probe_val
    return probe_val - margin_se * se


def size_depth_to_budget(decision: dict, *, fitting_steps: int, min_steps: int, deep_freeze_depth: int,
                         timing: dict) -> dict:
    """small + different under `trainer.time_limit`: the shallow unfreeze (top `shallow_unfreeze` groups) suits a
    short fine-tune; when the budget fits at least `min_steps` train steps with only the first `deep_freeze_depth`
    groups frozen (`fitting_steps`, from a timed step at that depth: training/budget_depth.py), the middle layers train
    too. On chest_xray the shallow fine-tune beat `partial` (2 groups frozen) at 1 minute (85.2 against 67.5, seed
    42) and lost at 5 (79.3 +- 2.1 against 84.1 +- 3.3, 3 seeds; partial ran about 310 steps). Sized to the
    budget, auto stayed shallow at 1 minute (52-91 steps would fit) and went deep from 2 (130-195): 83.5 +- 3.1
    at 5 minutes where the fine-tune was kept (4 of 5 seeds), 85.8 at 10 (README "Measured: time budgets")."""
    shallow, deep = decision["freeze_depth"], min(deep_freeze_depth, decision["n_groups"])
    chosen = deep if fitting_steps >= min_steps else shallow  # deep < shallow: deepens_with_budget
    if chosen == deep:
        why = (f"about {fitting_steps} train steps fit in trainer.time_limit with the first {deep} groups frozen "
               f"(>= {min_steps}), so the fine-tune trains all but those")
    else:
        why = (f"about {fitting_steps} train steps would fit in trainer.time_limit with the first {deep} groups "
               f"frozen (< {min_steps}), so the shallow unfreeze stays")
    return {**decision, "freeze_depth": chosen, "rule": f"{decision['rule']}; {why}",
            "budget_depth": {"chosen": "deep" if chosen == deep else "shallow", "shallow_freeze_depth": shallow,
                             "deep_freeze_depth": deep, "fitting_steps": fitting_steps, "min_steps": min_steps,
                             "timed_step_s": timing["step_s"], "timed_forward_s": timing["forward_s"],
                             "timed_batch": timing["batch"]}}


def decide_strategy(model: torch.nn.Module, train_split: Split, transform, device: torch.device, *, n_groups: int,
                    auto_cfg, seed: int = 0) -> dict:
    """Measure size and similarity, apply the rule, and return the decision record."""
    size = size_class(train_split.counts(), auto_cfg.large_per_class, auto_cfg.large_total)
    features = measure_separability(model, train_split, transform, device, max_per_class=auto_cfg.sample_per_class,
                                    max_total=auto_cfg.sample_total, seed=seed)
    sample = sample_per_class(train_split, auto_cfg.sample_per_class, auto_cfg.sample_total, seed)
    pixels = pixel_separability(sample, seed=seed)
    gain = features["separability"] - pixels["separability"]
    similar = bool(gain >= auto_cfg.similar_gain)
    mode, depth, rule = choose_mode(size["size"], similar, n_groups, similar_freeze_depth=auto_cfg.similar_freeze_depth,
                                    shallow_unfreeze=auto_cfg.shallow_unfreeze)
    decision = {"mode": mode, "freeze_depth": depth, "rule": rule, "n_groups": n_groups, **size,
                "similarity": {"feature_separability": features["separability"],
                               "feature_cv_balanced_accuracy": features["cv_balanced_accuracy"],
                               "feature_logme": features["logme"],  # recorded for comparison, not in the rule
                               "pixel_separability": pixels["separability"],
                               "pixel_cv_balanced_accuracy": pixels["cv_balanced_accuracy"],
                               "gain": gain, "similar_gain_threshold": auto_cfg.similar_gain,
                               "similar": similar, "sample_images": features["n_samples"],
                               "seconds": features["seconds"]}}
    _logger.info("Auto strategy: %s (%s; min/class %d, total %d; feature sep %.3f, pixel sep %.3f, gain %.3f)",
                 mode, rule, size["min_per_class"], size["total"], features["separability"],
                 pixels["separability"], gain)
    return decision


def decision_paragraph(d: dict) -> list[str]:
    s = d["similarity"]
    return ["## Strategy decision (auto)", "",
            f"The training set has {d['total']} images, at least {d['min_per_class']} per class, so it counts as "
            f"**{d['size']}** (large needs >= {d['large_per_class']} per class and >= {d['large_total']} in all). "
            f"On a sample of {s['sample_images']} images, frozen pretrained features separate the classes with "
            f"cross-validated balanced accuracy {s['feature_cv_balanced_accuracy']:.3f} (separability "
            f"{s['feature_separability']:.3f}), raw pixels with {s['pixel_cv_balanced_accuracy']:.3f} (separability "
            f"{s['pixel_separability']:.3f}): a gain of {s['gain']:.3f}, so the data is **"
            f"{'similar' if s['similar'] else 'different'}** (threshold {s['similar_gain_threshold']}). "
            f"Rule: {d['rule']}. Chosen: `strategy.mode={d['mode']}`, freeze depth {d['freeze_depth']} of "
            f"{d['n_groups']} layer groups.", *budget_paragraph(d.get("budget")), ""]


def budget_record(probe: dict | None, history: list[dict], best_epoch: int, monitor: str, *, mode: str, limit: str,
                  fit: dict, bar: float | None = None) -> dict:
    """decision.json `budget` (trainer.time_limit): what auto tried in the budget, for how long, what it kept and
    why. `probe`: the probe's info (features/probe_init.py) when auto fitted one before a fine-tune, else None;
    `fit`: the fine-tune's budget report (training/budget.py); `bar`: the val a fine-tune epoch had to beat
    (probe_bar), None when it was the probe's val itself."""
    record = {"limit": limit, "mode": mode, "tried": []}
    if probe is not None and not probe.get("resumed"):
        record["tried"].append({"what": "probe", "val": probe.get(f"val_{monitor}"), "seconds": probe.get("seconds"),
                                "epochs": probe.get("epochs")})
    record["tried"].append({"what": f"fine-tune ({mode})", "epochs_run": fit.get("epochs_run"),
                            "planned_epochs": fit.get("planned_epochs"), "stopped": fit.get("stopped"),
                            "seconds": _fit_seconds(fit), "val_per_epoch": [h.get(f"val_{monitor}") for h in history]})
    to_beat = _bar_text(probe, monitor, bar) if probe is not None else ""
    if probe is not None and best_epoch == 0:
        record.update(kept="probe", why=f"no fine-tune epoch beat {to_beat} within the budget")
    elif probe is not None and not probe.get("resumed"):
        record.update(kept=f"fine-tune epoch {best_epoch}", why=f"it beat {to_beat}")
    else:
        record.update(kept=f"fine-tune epoch {best_epoch}", why="best val epoch of the fine-tune")
    return record


def _bar_text(probe: dict, monitor: str, bar: float | None) -> str:
    """What a fine-tune epoch had to beat: the probe's val, less the margin where the rule picked a fine-tune."""
    val = probe.get(f"val_{monitor}")
    if val is None:
        return f"the probe's val {monitor}"
    if bar is None or bar == val:
        return f"the probe's val {monitor} ({val:.4f})"
    return (f"the probe's val {monitor} less the margin the rule's fine-tune gets ({val:.4f} - {val - bar:.4f} = "
            f"{bar:.4f}: strategy.auto.probe_margin_se standard errors)")


def _fit_seconds(fit: dict) -> float | None:
    if fit.get("loop_end_s") is None or fit.get("spent_before_training_s") is None:
        return None
    return round(fit["loop_end_s"] - fit["spent_before_training_s"], 1)


def budget_paragraph(record: dict | None) -> list[str]:
    """summary.md: the time budget's use, after the decision paragraph; [] without a budget."""
    if not record:
        return []
    lines = ["", f"Time budget `trainer.time_limit={record['limit']}`:"]
    for t in record["tried"]:
        if t["what"] == "probe":
            lines.append(f"- tried the linear probe on cached features: val {_num(t['val'])} in {_num(t['seconds'])} s "
                         f"({t['epochs']} head epochs)")
        else:
            lines.append(f"- tried the {t['what']} for the time left: {t['epochs_run']} epoch(s) of "
                         f"{t['planned_epochs']} planned in {_num(t['seconds'])} s (stopped: {t['stopped']}), val "
                         f"per epoch {', '.join(_num(v) for v in t['val_per_epoch']) or 'none'}")
    lines.append(f"- kept: **{record['kept']}**: {record['why']}.")
    return lines


def _num(v) -> str:
    """Scores with 4 decimals, seconds with 1."""
    if not isinstance(v, float):
        return "n/a" if v is None else str(v)
    return f"{v:.4f}" if abs(v) <= 1.5 else f"{v:.1f}"


def write_decision(run_dir: Path, decision: dict) -> None:
    write_json(Path(run_dir) / "decision.json", decision)
