from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from retention_pipeline.email.message import SendResult
from retention_pipeline.sending import record
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config
from retention_pipeline_tests.sending.support import (
    SCHEMA,
    SECRET,
    SendingDatabase,
    User,
    add_users,
    compose_and_claim,
)
from retention_pipeline_tests.web.support import serving

PROVIDER_IDS = {"u1": "re-email-of-u1", "u2": "re-email-of-u2"}


def email_two_users(url: str) -> SendingDatabase:
    """Install the pipeline in the app database at `url`, where the loop then sent u1
    (Ada@Example.com) and u2 (bob@example.com) an email through Resend, which gave them the ids
    in `PROVIDER_IDS`."""
    config = make_config(url)
    engine = create_engine(url)
    install(engine, config)
    db = SendingDatabase(engine=engine, config=config, url=url)
    add_users(engine, [User("u1", "Ada@Example.com"), User("u2", "bob@example.com")])
    compose_and_claim(db)
    with engine.begin() as connection:
        record(
            connection,
            schema=SCHEMA,
            results=[
                SendResult(f"re_engagement:{user}:2026-11-20:0", "sent", email_id)
                for user, email_id in PROVIDER_IDS.items()
            ],
            provider="resend",
        )
    return db


@pytest.fixture
def emailed(app_database_url: str) -> Iterator[SendingDatabase]:
    """`email_two_users` on the test server."""
    db = email_two_users(app_database_url)
    yield db
    db.engine.dispose()


@pytest.fixture
def server(emailed: SendingDatabase, tmp_path: Path) -> Iterator[str]:
    """The web service over `emailed`, on a loopback port; yields its base URL."""
    with serving(
        emailed.engine,
        schema=SCHEMA,
        unsubscribe_secret=SECRET,
        journal=tmp_path / "unsubscribe_journal.jsonl",
    ) as url:
        yield url
