"""The network: the timm backbone and its weights, layer groups and freezing, checkpoints. Independent of data/."""
