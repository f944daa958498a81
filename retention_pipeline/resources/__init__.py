"""Dagster resources: thin wrappers over the plain modules."""
