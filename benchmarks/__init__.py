"""Rerunnable measurements on real PostgreSQL and real Dagster runs: `python -m benchmarks run`
for the whole set (see run.py), and the older single-purpose scripts beside it."""
