"""Binds the resource classes of `retention_pipeline.resources` to the keys every asset, job and
sensor asks for (`app_database`, `email`), choosing the email sender from the configuration."""

import dagster as dg

from retention_pipeline.config import RetentionConfig
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import email_resource


def resource_bindings(config: RetentionConfig) -> dict[str, object]:
    """The resources of this configuration: the app database reads no second copy of it."""
    # Handed to the assets as is: a resource rebuilt from its fields would load the file again.
    app_database = dg.ResourceDefinition.hardcoded_resource(
        AppDatabase.of(config), description=AppDatabase.__doc__
    )
    return {"app_database": app_database, "email": email_resource(config)}
