"""Run the web app under uvicorn, with JSON log lines on stderr."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import uvicorn
from sqlalchemy import Engine
from starlette.types import ASGIApp

from retention_pipeline.database.embedded import retention_home
from retention_pipeline.web.app import create_app
from retention_pipeline.web.journal import UnsubscribeJournal

MAX_HEAD_BYTES = 256 * 1024
"""Request line and headers. Up to this the app sees the request and answers a long URL with a
clean 414; past it uvicorn answers 400 and drops the connection, which a client still sending
may see as a reset instead."""


def uvicorn_config(app: ASGIApp, *, host: str, port: int) -> uvicorn.Config:
    """How `serve` runs `app`; port 0 picks a free port."""
    # uvicorn's access line prints the query string, the unsubscribe token: off, whichever
    # handlers logging has (it logs whenever its logger has one). The app logs requests itself.
    logging.getLogger("uvicorn.access").disabled = True
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http="h11",  # h11 bounds the request head; httptools does not
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        access_log=False,
        log_config=None,
        server_header=False,
        lifespan="on",  # the app replays its unsubscribe journal in the background
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
    )


def serve(
    engine: Engine,
    *,
    schema: str,
    unsubscribe_secret: str,
    previous_unsubscribe_secrets: Sequence[str],
    webhook_secret: str,
    product_name: str,
    loop_names: Sequence[str],
    host: str,
    port: int,
) -> None:
    """Serve until SIGINT or SIGTERM. Unsubscribes the database cannot take wait in
    `$RETENTION_HOME/unsubscribe_journal_<schema>.jsonl`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # The health check reads the schema's revision, which alembic announces at INFO every time.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    app = create_app(
        engine,
        schema=schema,
        unsubscribe_secret=unsubscribe_secret,
        previous_unsubscribe_secrets=previous_unsubscribe_secrets,
        webhook_secret=webhook_secret,
        product_name=product_name,
        loop_names=loop_names,
        journal=UnsubscribeJournal(retention_home() / f"unsubscribe_journal_{schema}.jsonl"),
    )
    logging.getLogger(__name__).info(
        "serving POST /webhooks/resend, GET and POST /unsubscribe, GET /healthz on http://%s:%d",
        host,
        port,
    )
    uvicorn.Server(uvicorn_config(app, host=host, port=port)).run()


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the access log's fields, and
    for an error its type and traceback (for the operator; callers never see them)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)
