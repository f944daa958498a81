"""The days whose audience of a loop was built again (`audience_days_rebuilt`): their audience
rows may lack an email that went out, so the frequency cap reads their emails from the send log
(`audience.build`). A rebuild records the day it takes rows back from; what else may leave an
email without its row records the days of those emails here."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Connection, text


def record_emailed_days_as_rebuilt(
    connection: Connection,
    schema: str,
    emails: str = "TRUE",
    params: Mapping[str, object] | None = None,
) -> None:
    """Record as built again the days of the send log's emails that `emails` selects (a
    condition on `email_send_log`, with its `params`)."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    connection.execute(
        text(f"""
            INSERT INTO {s}.audience_days_rebuilt (loop_name, partition_date)
            SELECT DISTINCT loop_name, partition_date FROM {s}.email_send_log WHERE {emails}
            ON CONFLICT DO NOTHING"""),
        dict(params or {}),
    )
