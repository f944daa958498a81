"""Each open episode knows the day its next step falls due, so a day's audience reads only the
episodes with a step due instead of every open one.

`next_step_on` is the day the earliest step the episode has not had falls due (`infinity` once
it has had them all), NULL while not known: the audience computes it for every episode it reads,
and a rebuild of a day forgets it for the episodes whose steps of that day it takes back. An
episode's next step depends only on its assignments and its period's design, which is frozen, so
the day stays right until one of them changes. Episodes already open start unknown: the first
build after the upgrade reads them all once, as every build did before.

Revision ID: 0020
Revises: 0019
"""

from alembic import op

revision = "0020"
down_revision = "0019"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.episodes ADD COLUMN next_step_on date")
    op.execute(
        f"CREATE INDEX episodes_open_by_next_step ON {q}.episodes (loop_name, next_step_on) "
        "WHERE ended_on IS NULL"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP INDEX {q}.episodes_open_by_next_step")
    op.execute(f"ALTER TABLE {q}.episodes DROP COLUMN next_step_on")
