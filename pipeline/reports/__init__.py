"""What a person reads after a run or a sweep: the summary, plots, galleries and previews."""
