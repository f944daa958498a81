"""`demo seed` refuses arguments out of range in one line naming the option, before touching any
database."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.cli import main
from retention_pipeline_tests.helpers import write_config


@pytest.mark.parametrize(
    ("option", "value", "line"),
    [
        (
            "--days",
            "55",
            "error: --days: must be between 56 and 3650, got 55 (churned users need a few weeks "
            "of use and then 30 days of silence)\n",
        ),
        ("--users", "0", "error: --users: must be between 1 and 100,000,000, got 0\n"),
    ],
)
def test_demo_seed_out_of_range_is_one_line_naming_the_option(
    app_database_url, tmp_path, capsys, option, value, line
):
    config_path = str(write_config(tmp_path, app_database_url))
    assert main(["--config", config_path, "demo", "seed", option, value]) == 2
    assert capsys.readouterr().err == line
    engine = create_engine(app_database_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM users")).scalar() == 0
    engine.dispose()
