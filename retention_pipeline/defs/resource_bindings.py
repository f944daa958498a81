"""Binds the resource classes of `retention_pipeline.resources` to the keys every asset, job and
sensor asks for (`app_database`, `email`), choosing the email sender from the configuration."""

import dagster as dg

from retention_pipeline.config import load_config
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import email_resource


@dg.definitions
def resource_bindings() -> dg.Definitions:
    return dg.Definitions(
        resources={"app_database": AppDatabase(), "email": email_resource(load_config())}
    )
