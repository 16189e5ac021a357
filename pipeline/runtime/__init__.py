"""Process and run-time plumbing that every layer may use: devices, collectives, seeds, files, locks."""
