"""The outcomes step's upkeep of the audience's tables."""

from __future__ import annotations

from retention_pipeline.database.connection import create_app_engine
from retention_pipeline.database.maintenance import vacuum_audience_tables
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import audience_tables_vacuumed, login_role, make_config


def test_the_owner_vacuums_and_another_role_is_told_which_tables_it_left(app_database_url):
    owner = create_app_engine(app_database_url)
    install(owner, make_config(app_database_url))
    grants = [
        "GRANT USAGE ON SCHEMA retention TO {role}",
        "GRANT ALL ON ALL TABLES IN SCHEMA retention TO {role}",
    ]
    try:
        with login_role(owner, app_database_url, grants) as (_, writer):
            assert vacuum_audience_tables(writer, "retention") == [
                "episodes",
                "reengagement_audience",
            ]
        assert audience_tables_vacuumed(owner) == {
            "episodes": False,
            "reengagement_audience": False,
        }

        assert vacuum_audience_tables(owner, "retention") == []
        assert audience_tables_vacuumed(owner) == {"episodes": True, "reengagement_audience": True}
    finally:
        owner.dispose()
