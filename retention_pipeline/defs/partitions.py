"""The daily partitions every loop asset shares, in the loops' timezone."""

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date

import dagster as dg
import pandas as pd

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
    """Build the run's days oldest first, then report them: one day (the schedule) as it is;
    several (a backfill) as the values they share plus a per-day table, and each check passed
    only if it passed every day. Checks named in `warn_only` warn instead of failing."""
    results = {
        day: build_day(day) for day in sorted(map(date.fromisoformat, context.partition_keys))
    }
    if len(results) == 1:
        (only,) = results.values()
        yield dg.MaterializeResult(metadata=only.metadata)
        for name, (passed, metadata) in only.checks.items():
            yield _check(name, passed, metadata, warn_only)
        return
    yield dg.MaterializeResult(metadata=_shared_and_per_day(results))
    for name in next(iter(results.values())).checks:
        failing = [day.isoformat() for day, result in results.items() if not result.checks[name][0]]
        metadata = {"days_checked": len(results), "failing_days": ", ".join(failing) or "none"}
        yield _check(name, not failing, metadata, warn_only)


def _check(name: str, passed: bool, metadata: dict, warn_only: tuple[str, ...]):
    severity = dg.AssetCheckSeverity.WARN if name in warn_only else dg.AssetCheckSeverity.ERROR
    return dg.AssetCheckResult(check_name=name, passed=passed, severity=severity, metadata=metadata)


def _shared_and_per_day(results: dict[date, DayResult]) -> dict[str, object]:
    days = list(results)
    every = [result.metadata for result in results.values()]
    keys = list(
        dict.fromkeys(
            key
            for m in every
            for key, value in m.items()
            if not isinstance(value, dg.MetadataValue)
        )
    )
    shared = {
        key: every[0][key]
        for key in keys
        if all(key in m and m[key] == every[0].get(key) for m in every)
    }
    table = pd.DataFrame(
        [
            {"day": day.isoformat(), **{k: m.get(k) for k in keys if k not in shared}}
            for day, m in zip(days, every, strict=True)
        ]
    )
    last_tables = {k: v for k, v in every[-1].items() if isinstance(v, dg.MetadataValue)}
    return {
        **shared,
        **last_tables,  # the previews and tables of the last day
        "days": f"{days[0]} to {days[-1]} ({len(days)} days, one run)",
        "per_day": dg.MetadataValue.md(table.to_markdown(index=False)),
    }
