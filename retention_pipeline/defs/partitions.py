"""The daily partitions every loop asset shares, in the loops' timezone."""

import dagster as dg

from retention_pipeline.config import load_config

CONFIG = load_config()

daily_partitions = dg.DailyPartitionsDefinition(
    start_date=CONFIG.activity.history_start.isoformat(),
    timezone=CONFIG.timezone,
)
