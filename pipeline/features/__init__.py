"""The feature-extractor fast path: frozen features cached per split (cache), heads trained on them (heads),
the cached linear-probe run (fit) and the LogME backbone ranking (ranking)."""
