"""Segments classified once per set of thresholds: loops whose segment rules are the same read
the same rows instead of each writing every user again.

`classified_segments` (the table `engagement_segments` was, renamed in place with its day
partitions: nothing is rewritten) holds a day's segments under `rules_loop`, the first loop
classified with those thresholds; `segment_rules_used` says, per day, whose rows each loop
reads and under which thresholds (unknown, NULL, for the days before); `engagement_segments`
becomes the view joining the two, with the columns it had and the table's SELECT grants. Each
day already kept was classified per loop, so each of its loops reads its own rows.

A view of someone else's over `engagement_segments` would follow the renamed table and read
one loop's rows as every loop's: the upgrade stops instead, naming it.

Revision ID: 0019
Revises: 0018
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"

# The view condition queries read, as 0008 made it: it reads `engagement_segments` by name,
# and a view follows a renamed table, so it is made again over the new view.
USERS_VIEW = importlib.import_module(
    "retention_pipeline.database.migrations.versions.0008_day_partitions"
).USERS_VIEW

SEGMENTS_VIEW = """
    CREATE VIEW {q}.engagement_segments AS
    SELECT seg.partition_date, used.loop_name, seg.user_id, seg.segment, seg.reason,
           seg.entered_on
    FROM {q}.segment_rules_used AS used
    JOIN {q}.classified_segments AS seg
        ON seg.partition_date = used.partition_date AND seg.rules_loop = used.rules_loop"""


def _names(query: str, **parameters: str) -> list[str]:
    return list(op.get_bind().execute(sa.text(query), parameters).scalars())


def _partitions(schema: str, table: str) -> list[str]:
    preparer = op.get_context().dialect.identifier_preparer
    return _names(
        """
        SELECT child.relname FROM pg_catalog.pg_inherits AS link
        JOIN pg_catalog.pg_class AS child ON child.oid = link.inhrelid
        WHERE link.inhparent = to_regclass(:parent) ORDER BY 1""",
        parent=f"{preparer.quote_schema(schema)}.{preparer.quote(table)}",
    )


def _rename(schema: str, old: str, new: str, old_column: str, new_column: str) -> None:
    preparer = op.get_context().dialect.identifier_preparer
    q = preparer.quote_schema(schema)
    for partition in _partitions(schema, old):
        renamed = preparer.quote(new + partition.removeprefix(old))
        op.execute(f"ALTER TABLE {q}.{preparer.quote(partition)} RENAME TO {renamed}")
    op.execute(f"ALTER TABLE {q}.{old} RENAME TO {new}")
    op.execute(f"ALTER TABLE {q}.{new} RENAME COLUMN {old_column} TO {new_column}")
    op.execute(f"ALTER TABLE {q}.{new} RENAME CONSTRAINT {old}_pkey TO {new}_pkey")
    op.execute(f"ALTER INDEX {q}.{old}_by_segment RENAME TO {new}_by_segment")


def _refuse_other_views(schema: str) -> None:
    preparer = op.get_context().dialect.identifier_preparer
    q = preparer.quote_schema(schema)
    views = _names(
        """
        SELECT DISTINCT view.oid::regclass::text
        FROM pg_catalog.pg_depend AS dependency
        JOIN pg_catalog.pg_rewrite AS rule ON rule.oid = dependency.objid
        JOIN pg_catalog.pg_class AS view ON view.oid = rule.ev_class
        WHERE dependency.classid = 'pg_catalog.pg_rewrite'::regclass
          AND dependency.refobjid = to_regclass(:segments)
          AND view.oid <> to_regclass(:users)
        ORDER BY 1""",
        segments=f"{q}.engagement_segments",
        users=f"{q}.users",
    )
    if views:
        raise ValueError(
            f"revision 0019 makes {schema}.engagement_segments a view: drop "
            f"{', '.join(views)} (which read{'s' if len(views) == 1 else ''} it), upgrade, "
            "then create it again over the view"
        )


def _select_grantees(schema: str, table: str) -> list[str]:
    preparer = op.get_context().dialect.identifier_preparer
    q = preparer.quote_schema(schema)
    grantees = _names(
        """
        SELECT DISTINCT coalesce(role.rolname, 'PUBLIC')
        FROM pg_catalog.pg_class AS relation,
             aclexplode(relation.relacl) AS granted
        LEFT JOIN pg_catalog.pg_roles AS role ON role.oid = granted.grantee
        WHERE relation.oid = to_regclass(:table)
          AND granted.privilege_type = 'SELECT'
          AND granted.grantee <> relation.relowner
        ORDER BY 1""",
        table=f"{q}.{table}",
    )
    return [name if name == "PUBLIC" else preparer.quote(name) for name in grantees]


def upgrade(schema: str) -> None:
    preparer = op.get_context().dialect.identifier_preparer
    q = preparer.quote_schema(schema)
    _refuse_other_views(schema)
    readers = _select_grantees(schema, "engagement_segments")
    op.execute(f"DROP VIEW {q}.users")
    _rename(schema, "engagement_segments", "classified_segments", "loop_name", "rules_loop")
    op.execute(f"""
        CREATE TABLE {q}.segment_rules_used (
            partition_date date NOT NULL,
            loop_name text NOT NULL,
            rules_loop text NOT NULL,
            thresholds jsonb,
            PRIMARY KEY (partition_date, loop_name)
        )""")
    # The loops of each kept day, read from the day's segment index one loop at a time (a
    # partition holds a million rows per loop at a million users: never read them all).
    for partition in _partitions(schema, "classified_segments"):
        op.execute(f"""
            INSERT INTO {q}.segment_rules_used (partition_date, loop_name, rules_loop)
            WITH RECURSIVE loops AS (
                SELECT min(rules_loop) AS name FROM {q}.{preparer.quote(partition)}
                UNION ALL
                SELECT (SELECT min(rules_loop) FROM {q}.{preparer.quote(partition)}
                        WHERE rules_loop > loops.name)
                FROM loops WHERE loops.name IS NOT NULL
            )
            SELECT (SELECT partition_date FROM {q}.{preparer.quote(partition)} LIMIT 1),
                   name, name
            FROM loops WHERE name IS NOT NULL""")
    op.execute(SEGMENTS_VIEW.format(q=q))
    for reader in readers:
        op.execute(f"GRANT SELECT ON {q}.engagement_segments TO {reader}")
    op.execute(USERS_VIEW.format(q=q))


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP VIEW {q}.users")
    op.execute(f"DROP VIEW {q}.engagement_segments")
    # Every loop gets rows of its own again.
    op.execute(f"""
        INSERT INTO {q}.classified_segments
            (partition_date, rules_loop, user_id, segment, reason, entered_on)
        SELECT seg.partition_date, used.loop_name, seg.user_id, seg.segment, seg.reason,
               seg.entered_on
        FROM {q}.segment_rules_used AS used
        JOIN {q}.classified_segments AS seg
            ON seg.partition_date = used.partition_date AND seg.rules_loop = used.rules_loop
        WHERE used.loop_name <> used.rules_loop""")
    op.execute(f"DROP TABLE {q}.segment_rules_used")
    _rename(schema, "classified_segments", "engagement_segments", "rules_loop", "loop_name")
    op.execute(USERS_VIEW.format(q=q))
