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
