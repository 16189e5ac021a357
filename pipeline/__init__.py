"""Transfer-learning pipeline for image classification (timm + albumentations + Hydra)."""
from pipeline.startup import tune_allocator

tune_allocator()  # before torch allocates anything

__version__ = "0.1.0"
