"""Training a model end to end: run set-up, the epoch loop and the fit, loss, metrics, budgets, resume."""
