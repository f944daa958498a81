"""The daily partitions every loop asset shares, in the loops' timezone."""

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date

import dagster as dg

from retention_pipeline.config import ConfigError, RetentionConfig

# What `retention-pipeline dev` passes the Dagster processes it starts when the configuration
# sets no start_date: the first day with data of the database it just prepared.
START_DATE_ENV_VAR = "RETENTION_START_DATE"


def start_date_missing(first_data_day: date | None = None) -> str:
    """The one line saying that start_date must be set, with the line to add when the first day
    with data is known."""
    if first_data_day is None:
        return (
            "start_date: not set: add `start_date: YYYY-MM-DD` to the configuration, the first "
            "day snapshots and emails are made for (`retention-pipeline db upgrade` and "
            "`retention-pipeline check` print the first day with data)"
        )
    return (
        f"start_date: not set: add `start_date: {first_data_day.isoformat()}` to the "
        "configuration (the first day with data), or the first day snapshots and emails are "
        "made for"
    )


def partitions_start_date(
    config: RetentionConfig, environ: Mapping[str, str] | None = None
) -> date:
    """The first daily partition: `start_date`, else the day `dev` passes. Never read from the
    database: the definitions load while PostgreSQL is down."""
    if config.start_date:
        return config.start_date
    passed = (os.environ if environ is None else environ).get(START_DATE_ENV_VAR)
    if not passed:
        raise ConfigError(start_date_missing())
    try:
        return date.fromisoformat(passed)
    except ValueError:
        raise ConfigError(f"{START_DATE_ENV_VAR}: not a date (YYYY-MM-DD): {passed!r}") from None


def daily_partitions(config: RetentionConfig) -> dg.DailyPartitionsDefinition:
    """One partition per day of the loops' timezone, from the first partition on."""
    return dg.DailyPartitionsDefinition(
        start_date=partitions_start_date(config).isoformat(), timezone=config.timezone
    )


def previous_day_of(key: dg.AssetKey) -> dg.AssetDep:
    """A dependency on the asset's own partition of the day before: state carried from day to
    day makes a backfill run the days in order."""
    return dg.AssetDep(
        key, partition_mapping=dg.TimeWindowPartitionMapping(start_offset=-1, end_offset=-1)
    )


# A backfill of many days runs as one run, its days in ascending order inside each asset: each
# day builds on the one before, and Dagster's start-up cost per run would otherwise dominate.
daily_backfill_policy = dg.BackfillPolicy.single_run()


@dataclass
class DayResult:
    """What one asset did for one day: its metadata and its checks' (passed, metadata)."""

    metadata: dict[str, object]
    checks: dict[str, tuple[bool, dict[str, object]]] = field(default_factory=dict)


def day_by_day(
    context: dg.AssetExecutionContext,
    build_day: Callable[[date], DayResult],
    warn_only: tuple[str, ...] = (),
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Build the run's days oldest first, then report them: each day's materialization carries
    that day's own metadata (`report_each_day`); each check passes only if it passed every day.
    Checks named in `warn_only` warn instead of failing."""
    results = {
        day: build_day(day) for day in sorted(map(date.fromisoformat, context.partition_keys))
    }
    yield report_each_day(context, results)
    if len(results) == 1:
        (only,) = results.values()
        for name, (passed, metadata) in only.checks.items():
            yield _check(name, passed, metadata, warn_only)
        return
    for name in next(iter(results.values())).checks:
        failing = [day.isoformat() for day, result in results.items() if not result.checks[name][0]]
        metadata = {"days_checked": len(results), "failing_days": ", ".join(failing) or "none"}
        yield _check(name, not failing, metadata, warn_only)


def report_each_day(
    context: dg.AssetExecutionContext, results: dict[date, DayResult]
) -> dg.MaterializeResult:
    """The run's result, with each day's metadata on that day's own materialization, so the UI
    plots one point per day however many days a run built; a run of several days also says
    which (`days`) on each."""
    for day, result in results.items():
        context.add_asset_metadata(result.metadata, partition_key=day.isoformat())
    if len(results) == 1:
        return dg.MaterializeResult()
    first, *_, last = results
    return dg.MaterializeResult(
        metadata={"days": f"{first} to {last} ({len(results)} days, one run)"}
    )


def _check(name: str, passed: bool, metadata: dict, warn_only: tuple[str, ...]):
    severity = dg.AssetCheckSeverity.WARN if name in warn_only else dg.AssetCheckSeverity.ERROR
    return dg.AssetCheckResult(check_name=name, passed=passed, severity=severity, metadata=metadata)
