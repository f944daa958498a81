"""Daily activity snapshots, engagement segments and loop conditions (SQL, no Dagster)."""
