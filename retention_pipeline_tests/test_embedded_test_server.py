"""The embedded server: the tests' keeps working while other pytest sessions start on the
machine, and a home of any depth is still the demo's."""

from __future__ import annotations

import getpass
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline_tests.conftest import embedded_test_server


def test_the_embedded_test_server_outlives_another_pytest_session(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
):
    pytest_root = Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}"
    other_session = tmp_path / "other_session"
    other_session.mkdir()
    (other_session / "test_tiny.py").write_text("def test_tiny(tmp_path):\n    assert tmp_path\n")

    with embedded_test_server() as url:
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            data_directory = Path(connection.execute(text("SHOW data_directory")).scalar_one())
        # A pytest session makes its temporary root private, and may delete its --basetemp.
        for shared in (pytest_root, tmp_path_factory.getbasetemp()):
            assert not data_directory.is_relative_to(shared.resolve())

        other = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_tiny.py"],
            cwd=other_session,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode == 0, other.stdout + other.stderr

        with engine.connect() as connection:
            connection.execute(text("CREATE DATABASE after_another_session"))
        engine.dispose()
    assert not data_directory.exists()


def test_a_home_too_deep_for_a_socket_path_is_still_the_demos(embedded_home: Path):
    """PostgreSQL's socket path has a length limit (about 107 bytes on Linux): under a deep
    home the embedded server puts its socket elsewhere, and its URL is still the demo's."""
    from retention_pipeline.database import embedded

    home = embedded_home / ("deep-" * 16)
    url = embedded.start(home)
    try:
        assert f"host={embedded.data_directory(home)}" not in url
        assert embedded.is_embedded_url(url, home)
        assert not embedded.is_embedded_url(url, embedded_home / "another")
    finally:
        embedded.stop(home)
