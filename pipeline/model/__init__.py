"""The network: timm backbone with pretrained weights (backbone, embedded_weights), layer groups and freezing
(freezing), multi-depth pooled features (multidepth), and checkpoints that rebuild it (checkpoint).
Independent of data/."""
