"""One request pace for every send run of a provider account: the runs of several shards and
loops, in any process on any machine, together start at most `requests_per_second` requests.

Each request first reserves the next free start time in `send_pace` (one row per provider, one
statement, so reservations of concurrent senders queue on the row and never share a time), then
sleeps until it. Both the reservation and the "now" it is compared with come from the database's
clock, so the senders' own clocks do not need to agree. A sender's next request is not reserved
until its previous one was answered, so one sender alone paces as it would on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Engine, text


class SharedPace:
    """A `Pacer` (see `email.resend_sender`) whose request starts, together with those of every
    other `SharedPace` of the same schema and provider, are at least `1 / requests_per_second`
    apart."""

    def __init__(
        self,
        engine: Engine,
        *,
        schema: str,
        provider: str,
        requests_per_second: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be positive, got {requests_per_second}")
        self._engine = engine
        self._schema = schema
        self._provider = provider
        self._interval = 1.0 / requests_per_second
        self._sleep = sleep

    def wait(self) -> None:
        self._sleep(self.reserve())

    def reserve(self) -> float:
        """Reserve the next start time; return the seconds until it (0 when it is now)."""
        s = self._engine.dialect.identifier_preparer.quote_schema(self._schema)
        with self._engine.begin() as connection:
            delay = connection.execute(
                text(f"""
                    INSERT INTO {s}.send_pace AS pace (provider, next_request_at)
                    VALUES (:provider, clock_timestamp() + make_interval(secs => :interval))
                    ON CONFLICT (provider) DO UPDATE
                    SET next_request_at = greatest(pace.next_request_at, clock_timestamp())
                                          + make_interval(secs => :interval)
                    RETURNING extract(epoch FROM next_request_at - clock_timestamp())"""),
                {"provider": self._provider, "interval": self._interval},
            ).scalar_one()
        return max(0.0, float(delay) - self._interval)
