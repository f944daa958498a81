"""One request pace for every send run of a provider account: the runs of several shards and
loops, in any process on any machine, together start at most `requests_per_second` requests.

The pace is one row per provider in `send_pace`, holding when the next request may start. A
sender locks the row, sleeps until that time, sets it to now plus the interval and lets go, then
sends: the row lock is a token passed from request to request, and the other senders queue on it.
"Now" is the database's clock, so the senders' own clocks do not need to agree, and the interval
counts from when a request really started, so a sender that overslept does not bring the next
one closer. A sender asks for its next turn only once its previous request was answered, so one
sender alone paces as it would on its own.
"""

from __future__ import annotations

import time

from sqlalchemy import Engine, text

from retention_pipeline.email.resend_sender import JITTER_MARGIN_SECONDS


class SharedPace:
    """A `Pacer` (see `email.resend_sender`) whose request starts, together with those of every
    other `SharedPace` of the same schema and provider, are at least `1 / requests_per_second`
    (and `JITTER_MARGIN_SECONDS`) apart."""

    def __init__(
        self,
        engine: Engine,
        *,
        schema: str,
        provider: str,
        requests_per_second: float,
    ) -> None:
        if requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be positive, got {requests_per_second}")
        self._engine = engine
        self._schema = schema
        self._provider = provider
        self._interval = 1.0 / requests_per_second + JITTER_MARGIN_SECONDS

    def wait(self) -> None:
        s = self._engine.dialect.identifier_preparer.quote_schema(self._schema)
        provider = {"provider": self._provider}
        with self._engine.connect() as connection, connection.begin():
            connection.execute(
                text(f"""INSERT INTO {s}.send_pace (provider, next_request_at)
                         VALUES (:provider, clock_timestamp()) ON CONFLICT DO NOTHING"""),
                provider,
            )
            # The row lock is the token: the other senders wait here until this one starts.
            delay = connection.execute(
                text(f"""SELECT extract(epoch FROM next_request_at - clock_timestamp())
                         FROM {s}.send_pace WHERE provider = :provider FOR UPDATE"""),
                provider,
            ).scalar_one()
            time.sleep(max(0.0, float(delay)))
            connection.execute(
                text(f"""UPDATE {s}.send_pace
                         SET next_request_at = clock_timestamp() + make_interval(secs => :interval)
                         WHERE provider = :provider"""),
                {**provider, "interval": self._interval},
            )
