"""`strategy=auto` under `trainer.time_limit`: probe, planned fine-tune, paired selection (auto_budget.py)."""
