"""Resources shared by every asset, job and sensor."""

import dagster as dg

from retention_pipeline.resources.app_database import AppDatabase


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"app_database": AppDatabase()})
