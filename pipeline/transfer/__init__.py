"""Transfer-learning decisions: the auto strategy, what it measures, LR groups and gradual unfreezing."""
