"""Process and run-time plumbing that every layer may use: devices and speed options (devices), torchrun
collectives (distributed), seeds and RNG states (seeding), allocator and thread tuning (process), the one
atomic file writer (files) and the `key=value` command-line convention of the entry points (cli)."""
