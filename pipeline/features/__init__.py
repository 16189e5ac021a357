"""The feature-extractor fast path: frozen features cached per split (cache), heads trained on them (heads),
the cached linear-probe run (fit), the probe a fine-tune starts from (probe_init) or, under auto's time limit,
falls back to (probe_fallback), label-error candidates (label_issues) and the LogME backbone ranking (ranking)."""
