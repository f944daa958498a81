"""A loop's `recovery` as a Dagster retry policy: the configuration stays free of Dagster."""

import dagster as dg

from retention_pipeline.config.models import Recovery, parse_duration

BACKOFFS = {"exponential": dg.Backoff.EXPONENTIAL, "linear": dg.Backoff.LINEAR, "none": None}


def retry_policy(recovery: Recovery) -> dg.RetryPolicy:
    """The op retry policy of a loop's `recovery`: its retries, first delay and backoff."""
    return dg.RetryPolicy(
        max_retries=recovery.retries,
        delay=parse_duration(recovery.delay).total_seconds(),
        backoff=BACKOFFS[recovery.backoff],
    )


# The daily assets' own retries: a database failover, a deadlock or a statement timeout at 09:00
# would otherwise leave the day's audience unbuilt until someone runs it again. Every one of them
# rebuilds its day whole (a retry of a backfill starts its range over), and what cannot succeed
# on a second try (the configuration, the mapping) fails at once (`dg.Failure(allow_retries=
# False)`). Checks that fail are not op failures: they are never retried.
DAILY_ASSET_RETRIES = dg.RetryPolicy(max_retries=2, delay=60, backoff=dg.Backoff.EXPONENTIAL)
