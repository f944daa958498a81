"""The outcomes step's upkeep of the audience's tables."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.engine import make_url

from retention_pipeline.database.connection import create_app_engine
from retention_pipeline.database.maintenance import vacuum_audience_tables
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config


def _vacuumed(engine) -> dict[str, bool]:
    with engine.connect() as connection:
        return dict(
            connection.execute(
                text("""SELECT relname, last_vacuum IS NOT NULL AND last_analyze IS NOT NULL
                        FROM pg_stat_user_tables WHERE schemaname = 'retention'
                          AND relname IN ('episodes', 'reengagement_audience')""")
            ).all()
        )


def test_the_owner_vacuums_and_another_role_is_told_which_tables_it_left(app_database_url):
    owner = create_app_engine(app_database_url)
    install(owner, make_config(app_database_url))
    role = f"rp_writer_{uuid.uuid4().hex[:8]}"
    with owner.begin() as connection:
        connection.execute(text(f"CREATE ROLE {role} LOGIN"))
        connection.execute(text(f"GRANT USAGE ON SCHEMA retention TO {role}"))
        connection.execute(text(f"GRANT ALL ON ALL TABLES IN SCHEMA retention TO {role}"))
    writer = create_app_engine(make_url(app_database_url).set(username=role).render_as_string())
    try:
        assert vacuum_audience_tables(writer, "retention") == ["episodes", "reengagement_audience"]
        assert _vacuumed(owner) == {"episodes": False, "reengagement_audience": False}

        assert vacuum_audience_tables(owner, "retention") == []
        assert _vacuumed(owner) == {"episodes": True, "reengagement_audience": True}
    finally:
        writer.dispose()
        with owner.begin() as connection:
            connection.execute(text(f"DROP OWNED BY {role}"))
            connection.execute(text(f"DROP ROLE {role}"))
        owner.dispose()
