"""Transfer-learning pipeline for image classification (timm + albumentations + Hydra).

The package is layered (README "Layout"; contracts in pyproject.toml, checked by `make lint`):
entry points (train, export, predict, audit, preview, rank, report) sit at this top level and nothing
imports them; below them reports/ and ship/, then features/, training/, transfer/, model/ and data/,
runtime/, and config/errors at the bottom. Importing the package has no side effects.
"""
__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str):
    """`pipeline.load` (pipeline/ship/loading.py), imported on first use: `import pipeline` stays light."""
    if name == "load":
        from pipeline.ship.loading import load
        return load
    raise AttributeError(f"module 'pipeline' has no attribute '{name}'")
