"""Transfer-learning pipeline for image classification (timm + albumentations + Hydra)."""
from pipeline.startup import tune_allocator

tune_allocator()  # before torch allocates anything

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str):
    """`pipeline.load` (pipeline/loading.py), imported on first use: `import pipeline` stays light."""
    if name == "load":
        from pipeline.loading import load
        return load
    raise AttributeError(f"module 'pipeline' has no attribute '{name}'")
