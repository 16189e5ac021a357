"""Frozen features: the cache, heads on them, the cached probe fit, backbone ranking, label-error candidates."""
