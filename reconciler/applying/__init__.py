"""Apply a Plan: dependency waves, per-host concurrency, retries inside providers, dry-run as a
flag on the same path."""
