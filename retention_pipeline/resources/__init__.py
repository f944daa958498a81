"""Dagster resource classes: thin wrappers over the plain modules. The one home for them;
`defs/resource_bindings.py` only binds them to resource keys."""
