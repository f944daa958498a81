"""Alembic environment: runs on the connection (and transaction) the caller hands over."""

from alembic import context

connection = context.config.attributes["connection"]
schema = context.config.attributes["schema"]

context.configure(
    connection=connection,
    version_table_schema=schema,
    transactional_ddl=True,
)

with context.begin_transaction():
    context.run_migrations(schema=schema)
