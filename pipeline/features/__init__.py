"""The feature-extractor fast path: frozen features cached per split (cache), heads trained on them (heads),
the cached linear-probe run (fit), the probe a fine-tune starts from or auto's time budget fits first
(probe_init), label-error candidates (label_issues) and the LogME backbone ranking (ranking)."""
