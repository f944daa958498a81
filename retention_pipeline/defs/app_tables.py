"""The app's own tables as external assets, so lineage starts at the app's data."""

import dagster as dg

from retention_pipeline.config import RetentionConfig

APP_TABLE_DESCRIPTIONS = {
    "users": "The app's users (read only).",
    "events": "The app's product events (read only); triggers keep the activity rollup current.",
    "sessions": "The app's auth sessions (read only); triggers keep the activity rollup current.",
    "subscriptions": "Stripe subscriptions as the app stores them (read only).",
}


def app_table_specs(config: RetentionConfig) -> list[dg.AssetSpec]:
    """One external asset per mapped app table, named for the table it reads."""
    return [
        dg.AssetSpec(
            key=dg.AssetKey(["app", name]),
            description=APP_TABLE_DESCRIPTIONS[name],
            group_name="app",
            kinds={"postgres"},
            metadata={"table": dg.MetadataValue.text(mapping.qualified_name)},
        )
        for name, mapping in config.database.tables.items()
    ]
