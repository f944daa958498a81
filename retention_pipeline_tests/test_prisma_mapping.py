"""A Prisma-style schema (quoted camelCase names, naive timestamps, text ids) works through
configuration alone."""

from datetime import date

from sqlalchemy import create_engine, text

from retention_pipeline.database.activity_sources import resolve_sources
from retention_pipeline.database.app_tables import resolve_app_tables
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config

PRISMA_SCHEMA = """
CREATE TABLE "User" (
    "id" text PRIMARY KEY, "email" text NOT NULL, "fullName" text,
    "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE "ProductEvent" (
    "id" text PRIMARY KEY, "userId" text REFERENCES "User"("id"), "eventType" text NOT NULL,
    "payload" jsonb, "createdAt" timestamp(3) NOT NULL
);
CREATE TABLE "AuthSession" (
    "id" text PRIMARY KEY, "userId" text NOT NULL, "createdAt" timestamp(3) NOT NULL
);
CREATE TABLE "Subscription" (
    "id" text PRIMARY KEY, "userId" text NOT NULL, "status" text NOT NULL, "planName" text NOT NULL,
    "amountCents" integer NOT NULL, "interval" text NOT NULL, "updatedAt" timestamp(3)
);
"""

PRISMA_TABLES = {
    "users": {
        "table": "User",
        "columns": {"id": "id", "email": "email", "name": "fullName", "created_at": "createdAt"},
    },
    "events": {
        "table": "ProductEvent",
        "columns": {
            "user_id": "userId",
            "name": "eventType",
            "properties": "payload",
            "created_at": "createdAt",
        },
    },
    "sessions": {
        "table": "AuthSession",
        "columns": {"user_id": "userId", "created_at": "createdAt"},
    },
    "subscriptions": {
        "table": "Subscription",
        "columns": {
            "user_id": "userId",
            "status": "status",
            "plan": "planName",
            "amount_cents": "amountCents",
            "billing_interval": "interval",
            "updated_at": "updatedAt",
        },
    },
}


def test_prisma_schema_through_configuration_alone(create_database):
    url = create_database()
    engine = create_engine(url)
    config = make_config(url, timezone="America/New_York", tables=PRISMA_TABLES)
    with engine.begin() as connection:
        connection.exec_driver_sql(PRISMA_SCHEMA)
        connection.execute(
            text("""INSERT INTO "User" VALUES ('ckuser1', 'a@example.com', 'Ada', '2026-10-01')""")
        )
        # Prisma stores naive UTC: 03:30 UTC is 22:30 on the previous day in New York.
        connection.execute(
            text(
                """INSERT INTO "ProductEvent" VALUES ('e1', 'ckuser1', 'report.exported', '{}',
               '2026-11-21 03:30:00')"""
            )
        )
        users = resolve_app_tables(connection, config.database.tables)["users"]
        events = resolve_sources(connection, config.database, users)[0]
        assert events.column_types[events.spec.source.at] == "timestamp"
    install(engine, config)
    with engine.begin() as connection:
        connection.execute(
            text(
                """INSERT INTO "ProductEvent" VALUES ('e2', 'ckuser1', 'invite.sent', NULL,
               '2026-11-21 15:00:00')"""
            )
        )
        connection.execute(
            text("""INSERT INTO "AuthSession" VALUES ('s1', 'ckuser1', '2026-11-21 15:00:00')""")
        )
    update_rollup(engine, config)
    with engine.begin() as connection:
        rows = connection.execute(
            text(
                "SELECT user_id, day, event_count, session_count, last_event_at "
                "FROM retention.activity_daily ORDER BY day"
            )
        ).all()
    assert [tuple(row[:4]) for row in rows] == [
        ("ckuser1", date(2026, 11, 20), 1, 0),
        ("ckuser1", date(2026, 11, 21), 1, 1),
    ]
    assert rows[0].last_event_at.isoformat() == "2026-11-21T03:30:00+00:00"
    engine.dispose()
