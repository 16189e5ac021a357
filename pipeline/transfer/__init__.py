"""Transfer-learning decisions: the auto strategy (auto) and the separability it measures (separability),
LogME (logme), differential-LR parameter groups and the LR schedule (optim), gradual unfreezing (gradual)."""
