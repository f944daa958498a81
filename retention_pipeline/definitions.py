"""The Dagster definitions, the one way in: the configuration is loaded here, once, and handed to
`build_definitions`. Loading never touches the database, so the code location loads while
PostgreSQL is down."""

from retention_pipeline.config import load_config
from retention_pipeline.defs import build_definitions

defs = build_definitions(load_config())
