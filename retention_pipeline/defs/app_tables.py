"""The app's own tables as external assets, so lineage starts at the app's data: the users, each
activity source, and the subscriptions when the app bills."""

import dagster as dg

from retention_pipeline.config import RetentionConfig

USERS = dg.AssetKey(["app", "users"])
SUBSCRIPTIONS = dg.AssetKey(["app", "subscriptions"])
# What each capture mode means for the source's rows, as the UI describes the source.
CAPTURED_BY = {
    "inserts": "a trigger captures the rows the app inserts",
    "updates": "triggers capture inserted rows and each change of the time column the app "
    "updates in place",
    "polling": "each drain polls the rows newer than the last it read",
}


def source_key(name: str) -> dg.AssetKey:
    """The external asset of the activity source `name`."""
    return dg.AssetKey(["app", "activity", name])


def app_table_specs(config: RetentionConfig) -> list[dg.AssetSpec]:
    """One external asset for the users, one per activity source (named after the source), and
    one for the subscriptions when mapped."""
    users = config.database.tables.users
    specs = [_spec(USERS, "The app's users (read only).", users.qualified_name)]
    for source in config.database.activity_sources():
        what = "logins" if source.source.login else "product actions"
        specs.append(
            _spec(
                source_key(source.name),
                f"Activity source `{source.name}`: {what} (read only); "
                f"{CAPTURED_BY[source.capture]}.",
                source.source.qualified_name,
            )
        )
    subscriptions = config.database.tables.subscriptions
    if subscriptions is not None:
        specs.append(
            _spec(
                SUBSCRIPTIONS,
                "The subscriptions as the app (or its Stripe mirror) stores them (read only).",
                subscriptions.qualified_name,
            )
        )
    return specs


def _spec(key: dg.AssetKey, description: str, table: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=key,
        description=description,
        group_name="app",
        kinds={"postgres"},
        metadata={"table": dg.MetadataValue.text(table)},
    )


def reading_app_tables(
    asset: dg.AssetsDefinition, key: dg.AssetKey, app_keys: list[dg.AssetKey]
) -> dg.AssetsDefinition:
    """`asset` depending also on the app tables it reads, which the configuration names."""

    def with_app_deps(spec: dg.AssetSpec) -> dg.AssetSpec:
        if spec.key != key:
            return spec
        return spec.replace_attributes(deps=[*spec.deps, *app_keys])

    return dg.map_asset_specs(with_app_deps, [asset])[0]
