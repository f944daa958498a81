"""What the measurement counts, on real PostgreSQL: only assignments that could be emailed (a
backfill outside the send window is simulated), variants compared day by day (Simpson's
paradox), revenue per currency (an unknown billing interval stops the snapshot in one line),
and `emailed` right after the send."""

from __future__ import annotations

import copy
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import yaml
from sqlalchemy import text

from retention_pipeline.audience.build import build_audience
from retention_pipeline.email.outbox import OutboxSender
from retention_pipeline.outcomes.decisions import Decision, decide, store_decisions
from retention_pipeline.outcomes.performance import (
    performance_frame,
    performance_rows,
    simulated_assignments,
)
from retention_pipeline.segments.conditions import condition_user_ids
from retention_pipeline.segments.rules import build_day_segments
from retention_pipeline.segments.snapshot import SnapshotError, build_snapshot
from retention_pipeline.sending import send_loop_day
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT
from retention_pipeline_tests.test_audience import add_users, audience
from retention_pipeline_tests.test_outcomes import LONG_AGO, config_for, engine, evaluate, visit

__all__ = ["engine"]  # the fixture, shared with test_outcomes

UTC = ZoneInfo("UTC")
D = date(2026, 11, 10)


def morning_after(day: date) -> datetime:
    """When the daily run builds the audience of `day`: within its send window."""
    return datetime(day.year, day.month, day.day, 6, tzinfo=UTC) + timedelta(days=1)


def build_day(engine, config, day: date, now: datetime):
    update_rollup(engine, config)
    loop = config.loops[0]
    with engine.begin() as connection:
        build_snapshot(connection, config, day)
        build_day_segments(connection, "retention", config.loops, config.timezone, day)
    candidates = condition_user_ids(engine, "retention", loop, day)
    with engine.begin() as connection:
        return build_audience(
            connection, config=config, loop=loop, day=day, candidates=candidates, now=now
        )


def measure(engine, config, day: date):
    loop = config.loops[0]
    with engine.connect() as connection:
        rows = performance_rows(connection, "retention", loop, through=day)
    return rows, decide(loop, rows, day)


def variant_users(engine, day: date) -> dict[tuple[str, str | None], list[str]]:
    """A day's step-0 users by arm and, for the treated, variant, in user id order."""
    groups: dict[tuple[str, str | None], list[str]] = {}
    for user, step, _, arm, variant, _ in sorted(audience(engine, day), key=lambda r: int(r[0])):
        if step == 0:
            groups.setdefault((arm, variant if arm == "treatment" else None), []).append(user)
    return groups


def write_config(tmp_path, url: str, holdout: float):
    """The configuration of `config_for` as a file, for the command line."""
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    document["loops"][0].update(name="loop_0", holdout={"fraction": holdout})
    document["loops"][0]["steps"][0]["condition"] = {"type": "segment", "segment": "dormant"}
    path = tmp_path / "retention.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_a_backfill_outside_the_send_window_is_simulated_and_never_measured(
    engine, app_database_url, tmp_path, capsys
):
    from retention_pipeline.cli import main

    config = config_for(app_database_url, holdout=0.2)
    add_users(engine, range(1, 201), last_seen=LONG_AGO)
    # Built weeks later, as a backfill is: nobody can be emailed for that day.
    backfilled_at = morning_after(D) + timedelta(days=20)
    summary = build_day(engine, config, D, backfilled_at)
    assert summary.simulated and summary.treatment + summary.holdout == 200
    with engine.connect() as connection:
        flags = connection.execute(
            text("SELECT simulated, count(*) FROM retention.reengagement_audience GROUP BY 1")
        ).all()
    assert flags == [(True, 200)]
    # Variant a's users all come back, b's do not: noise the bandit would follow.
    groups = variant_users(engine, D)
    visit(engine, groups[("treatment", "a")], D + timedelta(days=2))
    decided_on = D + timedelta(days=7)
    evaluate(engine, config, decided_on)
    rows, decisions = measure(engine, config, decided_on)
    assert rows == []
    assert decisions[0].variant_shares == {"a": 0.5, "b": 0.5}
    assert "lift" not in decisions[0].evidence
    path = write_config(tmp_path, app_database_url, 0.2)
    assert main(["report", "--config", str(path)]) == 0
    assert capsys.readouterr().out == (
        "loop_0: no assignments yet\n200 simulated assignments (days built when no email could "
        "go out, as in a backfill) are not counted\n\n"
    )

    # The same day built on its own morning is an experiment, and moves the shares.
    assert not build_day(engine, config, D, morning_after(D)).simulated
    evaluate(engine, config, decided_on)
    rows, decisions = measure(engine, config, decided_on)
    step_0 = next(row for row in rows if row.step == 0 and row.variant is None)
    assert step_0.treatment.assigned + step_0.holdout.assigned == 200
    assert decisions[0].variant_shares["a"] > 0.85
    # Re-materialized later, outside the window, a day that was an experiment stays one.
    assert not build_day(engine, config, D, backfilled_at).simulated


# Simpson's paradox through the pipeline. Day 1 is a good day (the holdout returns 50%) and the
# decision in force gives b 90% of the treated; day 2 is a bad day (10%) and a gets 90%. On both
# days a returns 10 points more than b. Rates per day for the holdout, a and b:
GOOD_DAY, BAD_DAY = D, D + timedelta(days=8)
RATES = {GOOD_DAY: (0.5, 0.6, 0.5), BAD_DAY: (0.1, 0.2, 0.1)}


def test_a_variant_better_on_every_day_is_decided_better_though_it_got_the_bad_days(
    engine, app_database_url
):
    config = config_for(app_database_url, holdout=0.2)
    loop = config.loops[0]
    add_users(engine, range(1, 501), last_seen=LONG_AGO)
    # Dormant by the bad day only (as in test_outcomes' paused step).
    add_users(engine, range(1001, 1501), last_seen=datetime(2026, 11, 9, 12, tzinfo=UTC))
    with engine.begin() as connection:
        for day, shares in ((GOOD_DAY, {"a": 0.1, "b": 0.9}), (BAD_DAY, {"a": 0.9, "b": 0.1})):
            before = day - timedelta(days=1)
            store_decisions(
                connection, "retention", loop, before, [Decision(0, before, shares, False, "", {})]
            )
    for day in (GOOD_DAY, BAD_DAY):
        build_day(engine, config, day, morning_after(day))
        holdout_rate, a_rate, b_rate = RATES[day]
        for (_arm, variant), users in variant_users(engine, day).items():
            rate = {None: holdout_rate, "a": a_rate, "b": b_rate}[variant]
            visit(engine, users[: round(rate * len(users))], day + timedelta(days=2))
    decided_on = BAD_DAY + timedelta(days=7)
    evaluate(engine, config, decided_on)
    rows, decisions = measure(engine, config, decided_on)

    first_window = [row for row in rows if row.step == 0 and row.window_days == 7]
    by_variant = {row.variant: row for row in first_window if row.variant}
    # Pooled, b looks far better: it got the good day.
    assert by_variant["b"].treatment.rate > by_variant["a"].treatment.rate + 0.15
    # Day by day, a is 10 points above the holdout and b level with it.
    assert by_variant["a"].lift[0] == pytest.approx(0.1, abs=0.03)
    assert by_variant["b"].lift[0] == pytest.approx(0.0, abs=0.03)
    assert decisions[0].variant_shares["a"] > 0.75


def test_emailed_shows_in_the_report_right_after_the_send(
    engine, app_database_url, tmp_path, capsys
):
    from retention_pipeline.cli import main

    config = config_for(app_database_url, holdout=0.2)
    loop = config.loops[0]
    day = datetime.now(UTC).date() - timedelta(days=1)
    add_users(engine, range(1, 41), last_seen=datetime.now(UTC) - timedelta(days=60))
    summary = build_day(engine, config, day, datetime.now(UTC))
    assert not summary.simulated and summary.treatment > 0
    evaluate(engine, config, day)  # the morning's outcomes and performance, before the send
    path = write_config(tmp_path, app_database_url, 0.2)

    def report_and_table():
        assert main(["report", "--config", str(path), "--loop", "loop_0"]) == 0
        with engine.connect() as connection:
            rows = performance_rows(connection, "retention", loop)
        table = performance_frame(rows).drop(columns="loop").to_string(index=False)
        assert table in capsys.readouterr().out
        return next(row for row in rows if row.step == 0 and row.variant is None)

    assert report_and_table().treatment.emailed == 0  # nothing sent yet
    send_loop_day(
        engine,
        config=config,
        loop=loop,
        day=day,
        now=datetime.now(UTC),
        sender=OutboxSender(tmp_path / "outbox"),
        provider="outbox",
        unsubscribe_secret="unsubscribe-secret-for-tests",
        holder="test",
    )
    # No outcome re-evaluated: the report reads the send as it stands.
    assert report_and_table().treatment.emailed == summary.treatment


def subscribe(engine, rows) -> None:
    with engine.begin() as connection:
        for user, amount, currency, interval in rows:
            connection.execute(
                text(
                    "INSERT INTO subscriptions (user_id, status, plan, amount_cents, currency, "
                    "billing_interval) VALUES (:user, 'active', 'pro', :amount, :currency, "
                    ":interval)"
                ),
                {"user": user, "amount": amount, "currency": currency, "interval": interval},
            )


def test_revenue_is_a_line_per_currency_and_an_unknown_interval_one_line(engine, app_database_url):
    config = config_for(app_database_url, holdout=0.5)
    add_users(engine, range(1, 101), last_seen=LONG_AGO)
    build_day(engine, config, D, morning_after(D))
    groups = variant_users(engine, D)
    treated = groups[("treatment", "a")] + groups[("treatment", "b")]
    held = groups[("holdout", None)]
    # Every treated user pays 12,000 yen a year (the yen has no minor unit), every held-out one
    # 10 euros a month.
    subscribe(engine, [(user, 12000, "jpy", "year") for user in treated])
    subscribe(engine, [(user, 10_00, "EUR", "month") for user in held])
    day = D + timedelta(days=7)
    with engine.begin() as connection:
        build_snapshot(connection, config, day)
    evaluate(engine, config, day)
    with engine.connect() as connection:
        rows = performance_rows(connection, "retention", config.loops[0], through=day)
    step_0 = next(
        row for row in rows if row.step == 0 and row.variant is None and row.window_days == 7
    )
    assert step_0.treatment.revenue_cents == {"JPY": 1000 * len(treated)}
    assert step_0.holdout.revenue_cents == {"EUR": 10_00 * len(held)}
    difference = step_0.monthly_revenue_difference_cents
    assert difference == {
        "EUR": pytest.approx(-10_00 * len(treated)),
        "JPY": pytest.approx(1000 * len(treated)),
    }
    cell = performance_frame([step_0]).iloc[0]["billed MRR difference"]
    assert cell == f"-{10 * len(treated):,} EUR, +{1000 * len(treated):,} JPY"

    # A billing interval the snapshot does not know stops it, naming the value.
    subscribe(engine, [("1", 500, "usd", "fortnight")])
    with pytest.raises(SnapshotError) as error, engine.begin() as connection:
        build_snapshot(connection, config, day + timedelta(days=1))
    assert str(error.value).startswith(
        "database.tables.subscriptions.columns.billing_interval: unknown billing interval "
        "'fortnight' (known: day, "
    )
    assert "\n" not in str(error.value)


def test_a_billed_user_whose_amount_the_app_does_not_store_has_no_known_revenue(
    engine, app_database_url
):
    # As with `amount: none`: the app keeps the status and leaves the amount to Stripe.
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE subscriptions ALTER amount_cents DROP NOT NULL"))
    config = config_for(app_database_url, holdout=0.5)
    add_users(engine, range(1, 101), last_seen=LONG_AGO)
    build_day(engine, config, D, morning_after(D))
    groups = variant_users(engine, D)
    everyone = [user for users in groups.values() for user in users]
    subscribe(engine, [(user, None, "EUR", "month") for user in everyone])
    day = D + timedelta(days=7)
    with engine.begin() as connection:
        build_snapshot(connection, config, day)
    evaluate(engine, config, day)
    with engine.connect() as connection:
        rows = performance_rows(connection, "retention", config.loops[0], through=day)
    step_0 = next(
        row for row in rows if row.step == 0 and row.variant is None and row.window_days == 7
    )
    assert (step_0.treatment.revenue_known, step_0.holdout.revenue_known) == (0, 0)
    assert step_0.monthly_revenue_difference_cents == {}


def test_a_backfill_through_the_assets_leaves_the_variant_shares_even(
    engine, app_database_url, tmp_path
):
    """The daily assets of past days, materialized today as a backfill is: the audience knows
    its days are history, and the decisions of the performance asset do not follow their noise
    (variant a's users all come back, b's never do)."""
    import dagster as dg

    from retention_pipeline.defs.audience import AUDIENCE
    from retention_pipeline.defs.outcomes import OUTCOMES, PERFORMANCE
    from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
    from retention_pipeline.resources.app_database import AppDatabase
    from retention_pipeline_tests.helpers import shipped_asset

    config = config_for(app_database_url, holdout=0.2)
    path = write_config(tmp_path, app_database_url, 0.2)
    add_users(engine, range(1, 301), last_seen=LONG_AGO)
    assets = [shipped_asset(key) for key in (SNAPSHOT, SEGMENTS, AUDIENCE, OUTCOMES, PERFORMANCE)]
    resources = {"app_database": AppDatabase(config_path=str(path))}
    days = [D + timedelta(days=offset) for offset in range(8)]
    with dg.instance_for_test() as instance:
        for day in days:
            update_rollup(engine, config)
            result = dg.materialize(
                assets,
                partition_key=day.isoformat(),
                instance=instance,
                resources=resources,
                selection=[asset.key for asset in assets],
            )
            assert result.success
            if day == D:
                (built,) = result.asset_materializations_for_node(
                    "retention__reengagement_audience"
                )
                assert built.metadata["loop_0/simulated"].value is True
                groups = variant_users(engine, D)
                visit(engine, groups[("treatment", "a")], D + timedelta(days=2))
        (performance,) = result.asset_materializations_for_node("retention__campaign_performance")
        # An unknown billing interval fails the snapshot asset with the one line naming it.
        subscribe(engine, [("1", 500, "usd", "fortnight")])
        failed = dg.materialize(
            [assets[0]],
            partition_key=(days[-1] + timedelta(days=1)).isoformat(),
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_failure_data.user_failure_data.description.startswith(
        "database.tables.subscriptions.columns.billing_interval: unknown billing interval "
        "'fortnight' (known: "
    )
    # No decision moves the shares: simulated days have no outcomes, so the steps keep the even
    # split (a decision is stored only once a step has outcomes in its period).
    assert "shares a 50%" in performance.metadata["decisions"].value or (
        performance.metadata["decisions"].value == ""
    )
    with engine.connect() as connection:
        assert (
            connection.execute(
                text("""SELECT count(*) FROM retention.campaign_decisions
                        WHERE variant_shares <> '{"a": 0.5, "b": 0.5}'::jsonb""")
            ).scalar_one()
            == 0
        )
        assert connection.execute(
            text("SELECT bool_and(simulated), count(*) > 0 FROM retention.reengagement_audience")
        ).one() == (True, True)
        assert simulated_assignments(connection, "retention", config.loops[0]) > 200


def test_a_variant_without_a_day_in_common_with_the_holdout_has_no_lift_yet():
    from retention_pipeline.outcomes.performance import ArmCounts, DayCounts, PerformanceRow

    row = PerformanceRow(
        loop="loop_0",
        step=0,
        template="re_engagement",
        variant="a",
        window_days=7,
        treatment=ArmCounts(assigned=20, finished=20, returned=5),
        holdout=ArmCounts(assigned=20, finished=20, returned=2),
        days=(DayCounts(D, 5, 20, 0, 0), DayCounts(D + timedelta(days=1), 0, 0, 2, 20)),
    )
    assert not row.measurable
    assert row.verdict == "not enough data yet (no day with outcomes in both arms)"
    assert performance_frame([row]).iloc[0]["decision evidence"] == "-"


def test_the_upgrade_marks_the_old_days_nobody_was_emailed_from_as_simulated(
    engine, app_database_url
):
    from alembic import command

    from retention_pipeline.database import migrate

    config = config_for(app_database_url, holdout=0.2)
    add_users(engine, range(1, 21), last_seen=LONG_AGO)
    build_day(engine, config, D, morning_after(D))
    assert evaluate(engine, config, D + timedelta(days=7)).assignments == 20
    emailed_day, recent_day = D + timedelta(days=10), datetime.now(UTC).date() - timedelta(days=1)
    with engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, "retention"), "0012")
        # The same assignments on two more days: one emailed from, one still recent.
        connection.execute(
            text("""CREATE TEMP TABLE copied AS
                    SELECT * FROM retention.reengagement_audience WHERE partition_date = :d"""),
            {"d": D},
        )
        for day in (emailed_day, recent_day):
            connection.execute(text("UPDATE copied SET partition_date = :day"), {"day": day})
            connection.execute(text("INSERT INTO retention.reengagement_audience TABLE copied"))
        connection.execute(
            text("""
                INSERT INTO retention.email_send_log (send_key, loop_name, user_id,
                    episode_start, step, partition_date, email, template, variant, batch_key,
                    subject, html, body_text, status)
                VALUES ('k', 'loop_0', '1', :day, 0, :day, 'user1@example.com',
                        're_engagement', 'a', 'b', 's', 'h', 't', 'sent')"""),
            {"day": emailed_day},
        )
        migrate.upgrade(connection, "retention")
        flags = dict(
            connection.execute(
                text("""SELECT partition_date, bool_and(simulated)
                        FROM retention.reengagement_audience GROUP BY 1""")
            ).all()
        )
        outcomes_left = connection.execute(
            text("SELECT count(*) FROM retention.reengagement_outcomes")
        ).scalar_one()
    assert flags == {D: True, emailed_day: False, recent_day: False}
    assert outcomes_left == 0  # those of the simulated day went with it
