"""30 days of daily runs on demo data whose generator has a true, known email effect: the
performance table and its plots find it, and the lift interval covers it."""

from __future__ import annotations

import copy
import json
from datetime import UTC, date, datetime, time, timedelta

import dagster as dg
import yaml
from sqlalchemy import create_engine, text

from retention_pipeline.audience.build import build_audience
from retention_pipeline.config import parse_config
from retention_pipeline.defs.audience import AUDIENCE
from retention_pipeline.defs.outcomes import OUTCOMES, PERFORMANCE
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.demo.seed import COMEBACK_TAG, EmailEffect, seed_demo
from retention_pipeline.outcomes.evaluate import evaluate_outcomes
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.segments.conditions import condition_user_ids
from retention_pipeline.segments.rules import build_day_segments
from retention_pipeline.segments.snapshot import build_snapshot
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import (
    SHIPPED_DOCUMENT,
    audience_tables_vacuumed,
    shipped_asset,
)

user_activity_snapshot = shipped_asset(SNAPSHOT)
engagement_segments = shipped_asset(SEGMENTS)
reengagement_audience = shipped_asset(AUDIENCE)
reengagement_outcomes = shipped_asset(OUTCOMES)
campaign_performance = shipped_asset(PERFORMANCE)

END = date(2026, 11, 1)
EFFECT = EmailEffect(comeback_probability=0.5, holdout_salt="re_engagement", holdout_fraction=0.5)

# Per assignment of the first step: the share of the generator's comebacks (days L+9 to L+12
# after the last session, day L) that fall in the 7-day window, if the user ever made an event
# and does not come back on their own in the window. The true lift is the comeback probability
# times its mean, over both arms (the arm is a coin the behaviour does not see).
EXPOSED = """
WITH assigned AS (
    SELECT a.user_id, a.partition_date AS d,
           (SELECT max((s.created_at AT TIME ZONE 'UTC')::date) FROM sessions AS s
            WHERE s.user_id::text = a.user_id
              AND (s.created_at AT TIME ZONE 'UTC')::date <= a.partition_date) AS last_day
    FROM retention.reengagement_audience AS a
    JOIN retention.reengagement_outcomes AS o
      ON o.loop_name = a.loop_name AND o.partition_date = a.partition_date
     AND o.user_id = a.user_id AND o.window_days = 7
     AND o.partition_date + 7 <= o.evaluated_through
    WHERE a.step = 0
)
SELECT avg(
    (SELECT count(*) FROM generate_series(9, 12) AS r(r)
     WHERE a.last_day + r.r > a.d AND a.last_day + r.r <= a.d + 7) / 4.0
    * (EXISTS (SELECT FROM events AS e WHERE e.user_id::text = a.user_id
               AND (e.created_at AT TIME ZONE 'UTC')::date <= a.d))::int
    * (NOT EXISTS (SELECT FROM sessions AS s WHERE s.user_id::text = a.user_id
                   AND (s.created_at AT TIME ZONE 'UTC')::date BETWEEN a.d + 1 AND a.d + 7)
       AND NOT EXISTS (SELECT FROM events AS e WHERE e.user_id::text = a.user_id
                       AND NOT e.properties @> CAST(:tag AS jsonb)
                       AND (e.created_at AT TIME ZONE 'UTC')::date BETWEEN a.d + 1 AND a.d + 7)
      )::int)
FROM assigned AS a
"""


def test_thirty_daily_runs_find_the_demo_email_effect(create_database, tmp_path):
    url = create_database()
    engine = create_engine(url)
    with engine.begin() as connection:
        seed_demo(
            connection,
            users=3000,
            days=60,
            seed=7,
            end=datetime.combine(END, datetime.min.time(), UTC),
            email_effect=EFFECT,
        )
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    loop_document = document["loops"][0]
    # The built-in dormant segment, half held out.
    loop_document["steps"][0]["condition"] = {"type": "segment", "segment": "dormant"}
    loop_document["holdout"] = {"fraction": EFFECT.holdout_fraction}
    config_path = tmp_path / "retention.yaml"
    config_path.write_text(yaml.safe_dump(document))
    config = parse_config(document, environ={})
    (loop,) = config.loops
    install(engine, config)

    days = [END - timedelta(days=offset) for offset in range(30, 0, -1)]
    # Day by day, each audience built on its own morning (a backfill run today would be history:
    # simulated, never measured), then the last day through the assets.
    for day in days[:-1]:
        with engine.begin() as connection:
            build_snapshot(connection, config, day)
            build_day_segments(connection, "retention", [loop], config.timezone, day)
        candidates = condition_user_ids(engine, "retention", loop, day)
        with engine.begin() as connection:
            build_audience(
                connection,
                config=config,
                loop=loop,
                day=day,
                candidates=candidates,
                now=datetime.combine(day + timedelta(days=1), time(6), UTC),
            )
            evaluate_outcomes(connection, config=config, loop=loop, day=day)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [
                user_activity_snapshot,
                engagement_segments,
                reengagement_audience,
                reengagement_outcomes,
                campaign_performance,
            ],
            partition_key=days[-1].isoformat(),
            instance=instance,
            resources={"app_database": AppDatabase(config_path=str(config_path))},
            selection=[
                user_activity_snapshot.key,
                engagement_segments.key,
                reengagement_audience.key,
                reengagement_outcomes.key,
                campaign_performance.key,
            ],
        )
    assert result.success
    assert audience_tables_vacuumed(engine) == {"episodes": True, "reengagement_audience": True}
    metadata = result.asset_materializations_for_node("retention__campaign_performance")[0].metadata
    lower = metadata["re_engagement/step_0/7d/lift_lower"].value
    upper = metadata["re_engagement/step_0/7d/lift_upper"].value
    with engine.connect() as connection:
        exposed = connection.execute(text(EXPOSED), {"tag": json.dumps(COMEBACK_TAG)})
        true_lift = 100 * EFFECT.comeback_probability * float(exposed.scalar_one())
    assert 3 < true_lift < 30
    assert lower < true_lift < upper, (lower, true_lift, upper)
    assert lower > 0  # and the backfill is enough to see that the email works
    table = metadata["performance"].value
    assert "| step 0 re_engagement" in table and "points, 95% CI" in table
    assert metadata["re_engagement/step_0/7d/holdout_outcomes"].value > 100
    assert "re_engagement** step 0: shares a " in metadata["decisions"].value
    engine.dispose()
