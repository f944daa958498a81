"""`preview` renders a user's email as the send job would: with the step, arm and variant the
day's audience assigned the user."""

from __future__ import annotations

import dagster as dg
import pytest
from sqlalchemy import text

from retention_pipeline.cli import main
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline_tests.helpers import daily_assets, demo_until_yesterday, write_config


@pytest.fixture
def audience(create_database, tmp_path):
    """Yesterday's audience of the demo data, built by the daily assets."""
    url = create_database()
    engine, day = demo_until_yesterday(url)
    config_path = str(write_config(tmp_path, url))
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            daily_assets("user_activity_snapshot", "engagement_segments", "reengagement_audience"),
            partition_key=day.isoformat(),
            instance=instance,
            resources={"app_database": AppDatabase(config_path=config_path)},
        ).success
    yield engine, config_path, day
    engine.dispose()


def assigned(engine, day, arm: str, variant: str) -> str:
    with engine.connect() as connection:
        return connection.execute(
            text(
                "SELECT user_id FROM retention.reengagement_audience WHERE partition_date = :day "
                "AND step = 0 AND arm = :arm AND variant = :variant ORDER BY user_id LIMIT 1"
            ),
            {"day": day, "arm": arm, "variant": variant},
        ).scalar_one()


def preview(config_path, tmp_path, capsys, *arguments: str) -> str:
    out = tmp_path / "preview.html"
    command = ["--config", config_path, "preview", *arguments, "--out", str(out)]
    assert main(command) == 0
    return capsys.readouterr().out


def test_preview_shows_the_variant_the_audience_assigned(audience, tmp_path, capsys):
    engine, config_path, day = audience
    user = assigned(engine, day, "treatment", "b")
    printed = preview(config_path, tmp_path, capsys, "--template", "re_engagement", "--user", user)
    assert f"assigned on {day}: step 0 (re_engagement), treatment, variant b" in printed
    assert "work is right where you left it" in printed  # variant b's subject line
    # Asked for explicitly, another variant is shown, and the assignment is still named.
    printed = preview(
        config_path, tmp_path, capsys, "--template", "re_engagement", "--user", user,
        "--variant", "a",
    )  # fmt: skip
    assert "variant b; shown: variant a" in printed and "we miss you" in printed


def test_preview_names_a_holdout_assignment(audience, tmp_path, capsys):
    engine, config_path, day = audience
    user = assigned(engine, day, "holdout", "b")
    printed = preview(config_path, tmp_path, capsys, "--template", "re_engagement", "--user", user)
    assert f"assigned on {day}: step 0 (re_engagement), holdout (not emailed), variant b" in (
        printed
    )
