"""The daily partitions every loop asset shares, in the loops' timezone."""

import dagster as dg

from retention_pipeline.config import load_config
from retention_pipeline.tracking.state import partitions_start_date

CONFIG = load_config()

daily_partitions = dg.DailyPartitionsDefinition(
    start_date=partitions_start_date(CONFIG).isoformat(),
    timezone=CONFIG.timezone,
)


def previous_day_of(key: dg.AssetKey) -> dg.AssetDep:
    """A dependency on the asset's own partition of the day before: state carried from day to
    day makes a backfill run the days in order."""
    return dg.AssetDep(
        key, partition_mapping=dg.TimeWindowPartitionMapping(start_offset=-1, end_offset=-1)
    )
