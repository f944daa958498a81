"""The days of a loop whose audience rows may lack an email that went out
(`audience_days_rebuilt`), so the frequency cap reads their emails from the send log
(`audience.build`). A rebuild keeps the rows of a day whose emails began going out; what may
still leave an email without its row (an erasure, a reinstall's restored send log, and rebuilds
made before they kept them: revision 0027 records those) records the days of those emails
here."""

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
