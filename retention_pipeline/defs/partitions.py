"""The daily partitions every loop asset shares, in the loops' timezone."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date

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
