"""How much a step spilled to temporary files: PostgreSQL counts it per database."""

from sqlalchemy import Engine, text


def temp_bytes_so_far(engine: Engine) -> int:
    """Bytes written to temporary files in this database since its statistics were reset, by
    every session: the difference around a step is what the step (and anything running beside
    it) spilled."""
    with engine.connect() as connection:
        return connection.execute(
            text("SELECT temp_bytes FROM pg_stat_database WHERE datname = current_database()")
        ).scalar_one()
