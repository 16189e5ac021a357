"""Shipping a trained model: export with parity checks (export), the model card (model_card), loading for
inference without training code (loading) and batch prediction to CSV (predict)."""
