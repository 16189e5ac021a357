"""The run's human-readable `summary.md` and machine-readable `metrics.json`."""
from __future__ import annotations

from pathlib import Path

from pipeline.data.folder import DatasetSplits
from pipeline.runtime.files import write_json, write_text


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def dataset_section(data: DatasetSplits, name: str, root: str) -> list[str]:
    splits = {"train": data.train, "val": data.val, **({"test": data.test} if data.test else {})}
    lines = [f"## Dataset: {name}", "", f"- root: `{root}`", *([f"- layout: {data.layout}"] if data.layout else []),
             f"- classes ({len(data.classes)}): " + ", ".join(data.classes), f"- val split: {data.val_source}",
             *([f"- test split: {data.test_source}"] if data.test_source else []),
             "- every image's split: `split.csv` (path,label,split; `dataset.manifest=<it>` reproduces this split)",
             "", "| class | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    counts = {s: split.counts() for s, split in splits.items()}
    for c in data.classes:
        lines.append(f"| {c} | " + " | ".join(str(counts[s][c]) for s in splits) + " |")
    lines.append("| **total** | " + " | ".join(str(len(s)) for s in splits.values()) + " |")
    lines += ["", f"### Skipped files: {len(data.skipped)}", ""]
    lines += [f"- `{s['path']}`: {s['reason']}" for s in data.skipped] or ["none"]
    return lines + [""]


def model_section(model_info: dict) -> list[str]:
    keys = ("backbone", "weights", "mode", "freeze_depth", "n_groups", "bn", "trainable_params", "total_params",
            "preprocessing")
    return ["## Model", ""] + [f"- {k}: {model_info[k]}" for k in keys if k in model_info] + [""]


def results_section(metrics: dict) -> list[str]:
    lines = ["## Results", "", f"- best epoch: {metrics['best_epoch']} (by val {metrics['monitor']})",
             f"- train time: {metrics['train_seconds']:.1f} s"]
    lines += [f"- {gap_line(metrics['val_test_gap'])}"] if metrics.get("val_test_gap") else []
    lines += [f"- {leaks_line(metrics['leaks'])}"] if metrics.get("leaks") else []
    lines += invariance_lines(metrics.get("storage_invariance"))
    lines += unknown_lines(metrics.get("ood"))
    lines += [""]
    names = ("loss", "accuracy", "balanced_accuracy", "macro_f1")
    lines += ["| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for split in ("val", "test"):
        if metrics.get(split):
            label = f"{split} (leak-free)" if f"{split}_with_leaks" in metrics else split
            lines.append(f"| {label} | " + " | ".join(_fmt(metrics[split].get(n, "")) for n in names) + " |")
    for split in ("val", "test"):
        if metrics.get(f"{split}_with_leaks"):
            label = f"{split} with its {metrics['leaks'][split]['leaked']} leaked files"
            lines.append(f"| {label} | " + " | ".join(_fmt(metrics[f'{split}_with_leaks'].get(n, "")) for n in names)
                         + " |")
    lines += ["", "### Epochs", "", "| epoch | train loss | val loss | val acc | val bal. acc | img/s |",
              "|---|---|---|---|---|---|"]
    for h in metrics["history"]:
        lines.append(f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {h['val_accuracy']:.4f} "
                     f"| {h['val_balanced_accuracy']:.4f} | {h['train_img_per_s']:.1f} |")
    return lines + [""]


def gap_line(gap: dict) -> str:
    """One line on test vs val balanced accuracy (training/metrics.py val_test_gap)."""
    line = (f"test vs val: balanced accuracy {gap['test']:.4f} vs {gap['val']:.4f}, {100 * abs(gap['gap']):.1f} "
            f"points {'lower' if gap['gap'] >= 0 else 'higher'}"
            + (f" ({abs(gap['z']):.1f} standard errors)" if gap["z"] is not None else ""))
    if gap["shifted"]:
        return (line + ": SHIFTED TEST SPLIT, more than sampling explains; test is not drawn like val, so val "
                "(which chose the epoch, temperature and TTA) cannot see it. Put some images like test into val")
    return line + ": within what the two splits' sampling explains"


def leaks_line(leaks: dict) -> str:
    """One line on the val/test files set aside as copies of earlier files (data/leaks.py)."""
    held = [f"{leaks[s]['leaked']} of {leaks[s]['leaked'] + leaks[s]['leak_free']} {s}" for s in ("val", "test")
            if (leaks.get(s) or {}).get("set_aside")]
    kept = [s for s in ("val", "test") if s in leaks and not leaks[s]["set_aside"]]
    line = (f"leak-free metrics: {', '.join(held)} files copy a train (or val) file ({leaks['exact']} byte-identical, "
            f"{leaks['near']} near-identical); they were left out of epoch selection and calibration, and the headline "
            "rows below exclude them (the rows 'with its ... leaked files' count them)") if held else ""
    if kept:
        line += ("; " if line else "") + (f"every {' and '.join(kept)} file copies an earlier file, so those metrics "
                                          "count the copies and are optimistic")
    return line


def unknown_lines(record: dict | None) -> list[str]:
    """The "unknown" rule's bullet (training/ood_fit.py); [] when the run predates it."""
    if not record:
        return []
    if record.get("skipped"):
        return [f"- unknown images: no rule ({record['skipped']})"]
    return [f"- unknown images: cosine similarity to the {record['k']}th nearest of {record['train_images']} train "
            f"images' features below {record['threshold']:.4f} (keeps {100 * (1 - record['val_flagged']):.1f}% of "
            f"{record['val_images']} val images); load, predict and every export apply it"]


def invariance_lines(check: dict | None) -> list[str]:
    """The storage-invariance check's markdown bullets (training/invariance.py); [] when it did not run."""
    if not check:
        return []
    if check.get("skipped"):
        return [f"- storage invariance: not measured ({check['skipped']})"]
    verdict = "MODEL DEPENDS ON HOW FILES ARE STORED" if check["flagged"] else "predictions hold"
    lines = [f"- storage invariance ({check['images']} val images re-encoded, {check['metric']} "
             f"{check['baseline']:.4f}, standard error {check['se']:.4f}): {verdict}"]
    for name, r in check["storages"].items():
        lines.append(f"  - {name}: {r['images']} images, {100 * r['flipped']:.1f}% of predictions flip, "
                     f"{check['metric']} {100 * r['change']:+.1f} points" + (" (beyond the SE)" if r["beyond_se"]
                                                                               else ""))
    lines += [f"  - {name}: not run, {why}" for name, why in check.get("not_run", {}).items()]
    return lines


def imbalance_section(plan: dict) -> list[str]:
    """Class weights, sampler and prior bias as decided by training/loss.py (also in class_weights.json)."""
    prior = plan["prior_bias"]
    lines = ["## Class imbalance", "", f"- imbalance ratio (largest / smallest train class): "
             f"{plan['imbalance_ratio']:.2f}", f"- class weights: {plan['class_weights']}"
             + (f" (beta {plan['beta']})" if plan.get("beta") is not None else ""),
             f"- sampler: {plan['sampler']}",
             f"- prior bias: {'on' if prior['enabled'] else 'off'} (loss.prior_bias={prior['setting']})", "",
             "| class | train count | loss weight | prior |", "|---|---|---|---|"]
    for c, n in plan["train_counts"].items():
        lines.append(f"| {c} | {n} | {plan['weights'][c]:.4f} | {prior['prior'][c]:.4f} |")
    return lines + [""]


def per_class_section(metrics: dict) -> list[str]:
    """Precision / recall / F1 / support per class for val (best checkpoint) and test."""
    lines = ["## Per-class metrics", ""]
    for split in ("val", "test"):
        per_class = (metrics.get(split) or {}).get("per_class")
        if not per_class:
            continue
        lines += [f"### {split}", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
                  for c, m in per_class.items()]
        lines += ["", f"Confusion matrix: `confusion_{split}.png` / `.csv`; report: "
                  f"`classification_report_{split}.txt`.", ""]
    return lines if len(lines) > 2 else []


def strategy_sections(info: dict) -> list[list[str]]:
    """The auto decision paragraph (if any) and the per-layer-group parameter table."""
    from pipeline.budgeted.auto_budget import budget_paragraph
    from pipeline.transfer.auto import decision_paragraph

    decision = info.get("decision")
    sections = [decision_paragraph(decision)[:-1] + budget_paragraph(decision.get("budget")) + [""]] if decision else []
    if info.get("features"):
        from pipeline.features.cached_fit import features_section
        sections.append(features_section(info["features"]))
    if info.get("head_init"):
        from pipeline.features.probe_init import head_init_section
        sections.append(head_init_section(info["head_init"]))
    rows = ["## Parameters per layer group", "", "| group | first parameter | params | trainable at start |",
            "|---|---|---|---|"]
    rows += [f"| {g['group']} | `{g['first_param']}` | {g['params']:,} | {g['trainable']:,} |" for g in info["groups"]]
    return sections + [rows + [""]]


def budget_sections(budget: dict | None) -> list[list[str]]:
    """`trainer.time_limit` (training/budget.py): the plan, the measured speed and where the time went; [] without."""
    if not budget:
        return []
    m = {k: v if v is not None else float("nan") for k, v in budget["measured"].items()}
    at = f" ({budget['stopped_at']})" if budget["stopped_at"] else ""
    return [["## Time budget", "",
             f"- limit: {budget['limit']} ({budget['limit_s']:.0f} s); epochs planned: {budget['planned_epochs']} "
             f"(at most {budget['max_epochs']}; {budget['provisional_epochs']} after the first steps)",
             f"- epochs run: {budget['epochs_run']}; stopped: {budget['stopped']}{at}",
             f"- measured: {m['train_img_per_s']:.1f} train img/s, {m['s_per_step']:.3f} s/step, val evaluation "
             f"{m['eval_s']:.2f} s, checkpoints {m['checkpoint_s']:.2f} s per epoch",
             f"- time: {budget['spent_before_training_s']:.1f} s before training, loop ended at "
             f"{budget['loop_end_s']:.1f} s, {budget['after_loop_s']:.1f} s after it (kept: "
             f"{budget['kept_for_after_loop_s']:.1f} s), {budget['total_s']:.1f} s in all", ""]]


def averaging_sections(info: dict | None, history: list[dict]) -> list[list[str]]:
    """`trainer.ema` (training/averaging.py): which weights `best` holds and raw vs EMA val per epoch; [] without."""
    if not info:
        return []
    m = info["monitor"]
    lines = ["## Weight averaging (EMA)", "",
             f"- decay {info['decay']} (timm ModelEmaV3, warmup power {info['warmup_power']:.2f}); `best` holds the "
             f"**{info['chosen']}** weights (epoch {info['best_epoch']}: val {m} raw {_fmt(info['val_raw'])}, "
             f"EMA {_fmt(info['val_ema'])})", "", f"| epoch | raw val {m} | EMA val {m} |", "|---|---|---|"]
    lines += [f"| {h['epoch']} | {_fmt(h.get(f'val_{m}'))} | {_fmt(h.get(f'ema_val_{m}'))} |" for h in history]
    return [lines + [""]]


def calibration_sections(record: dict | None) -> list[list[str]]:
    """`trainer.tta` / `trainer.calibrate` (training/calibration.py): the TTA decision, the temperature and
    ECE/NLL/Brier before (T = 1) and after it, per split; [] without."""
    if not record:
        return []
    tta, scores = record["tta"], record["tta"].get("val") or {}
    kept = "mirrored view kept (logits averaged over identity + hflip)" if tta["kept"] else "no TTA"
    lines = ["## Calibration", "", f"- TTA (trainer.tta={tta['mode']}): {kept}" + (
        f"; val {tta['monitor']} {_fmt(scores['plain'])} plain, {_fmt(scores['tta'])} with hflip" if scores else ""),
        f"- temperature: {record['temperature']:.4f} ("
        + ("fitted on val, trainer.calibrate=true" if record["calibrate"] else "trainer.calibrate=false") + ")",
        "- applied by the test evaluation, `pipeline.load`, predict and every exported format; reliability "
        "diagram: `reliability_<split>.png`", "",
        "| split | ECE before | ECE after | NLL before | NLL after | Brier before | Brier after |",
        "|---|---|---|---|---|---|---|"]
    for split in ("val", "test"):
        if split in record:
            b, a = record[split]["before"], record[split]["after"]
            lines.append(f"| {split} | " + " | ".join(f"{_fmt(b[k])} | {_fmt(a[k])}" for k in ("ece", "nll", "brier"))
                         + " |")
    floors = [f"{split} {_fmt(record[split]['after']['ece_floor'])}" for split in ("val", "test")
              if "ece_floor" in record.get(split, {}).get("after", {})]
    if floors:
        lines += ["", "ECE floor (a perfectly calibrated model with these confidences, on this many images, would "
                  "score about this much ECE from sampling alone): " + ", ".join(floors) + "."]
    return [lines + [""]]


def run_sections(metrics: dict, model_info: dict) -> list[list[str]]:
    """The sections after the model's: strategy, time budget, calibration, weight averaging."""
    return (strategy_sections(model_info) + budget_sections(metrics.get("budget"))
            + calibration_sections(metrics.get("calibration"))
            + averaging_sections(metrics.get("weight_averaging"), metrics["history"]))


def write_run_files(run_dir: Path, metrics: dict, data: DatasetSplits, *, dataset_name: str, root: str,
                    model_info: dict, audit: dict | None = None) -> None:
    """metrics.json and summary.md; `model_info`: the backbone, weights, preprocessing and strategy facts."""
    write_json(run_dir / "metrics.json", metrics)
    lines = [f"# Run summary: {dataset_name} / {model_info.get('backbone')}", ""]
    lines += dataset_section(data, dataset_name, root)
    if audit:  # data/data_audit.py (+ features/label_issues.py); the full report is audit.json
        from pipeline.reports.audit_report import audit_section
        lines += audit_section(audit) + ["Full audit: `audit.json`.", ""]
    lines += model_section(model_info)
    for section in run_sections(metrics, model_info):
        lines += section
    if metrics.get("imbalance"):
        lines += imbalance_section(metrics["imbalance"])
    lines += results_section(metrics) + per_class_section(metrics)
    write_text(run_dir / "summary.md", "\n".join(lines))
