"""What a person reads after a run: summary.md and metrics (summary), confusion matrices and curves (plots),
sweep reports (sweep, sweep_plot, sweep_callback) and the augmentation preview (preview)."""
