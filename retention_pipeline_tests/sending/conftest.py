from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine

from retention_pipeline.tracking.install import install
from retention_pipeline_tests.email.fake_resend import FakeResend, serve_fake_resend
from retention_pipeline_tests.helpers import make_config
from retention_pipeline_tests.sending.support import SendingDatabase


@pytest.fixture
def sending_db(app_database_url: str) -> Iterator[SendingDatabase]:
    """The demo app's database with the pipeline's schema installed and nothing in it."""
    config = make_config(app_database_url)
    engine = create_engine(app_database_url)
    install(engine, config)
    yield SendingDatabase(engine=engine, config=config, url=app_database_url)
    engine.dispose()


@pytest.fixture
def fake_resend() -> Iterator[FakeResend]:
    """A running fake Resend API with the SDK pointed at it for the duration of the test."""
    with serve_fake_resend() as fake:
        yield fake
