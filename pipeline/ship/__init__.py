"""Shipping a trained model: export with parity checks, the model card, loading and prediction without training code."""
