"""Activity tracking: the rollup the triggers (or the incremental refresh) keep current."""
