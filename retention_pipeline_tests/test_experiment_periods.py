"""A frozen experiment design on real PostgreSQL: changing the holdout fraction, the salt, the
steps' order or a variant on a database with assignments starts a new period or is refused in
one line, and no assignment, decision or comparison mixes periods."""

from __future__ import annotations

import copy
from datetime import date, datetime, timedelta

import dagster as dg
import pytest
import yaml
from alembic import command
from sqlalchemy import create_engine, text

from retention_pipeline.audience.experiment import period_loop, periods
from retention_pipeline.cli import main
from retention_pipeline.config import ConfigError, parse_config
from retention_pipeline.config.models import TEMPLATE_VARIANTS
from retention_pipeline.database import migrate
from retention_pipeline.email.render import render_email
from retention_pipeline.outcomes.decisions import (
    Decision,
    decide_day,
    decisions_in_force,
    store_decisions,
)
from retention_pipeline.outcomes.performance import performance_rows
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.email.fake_resend import serve_fake_resend
from retention_pipeline_tests.email.test_render import context
from retention_pipeline_tests.helpers import (
    SHIPPED_DOCUMENT,
    daily_assets,
    demo_until_yesterday,
    write_config,
)
from retention_pipeline_tests.test_audience import (
    DORMANT_FROM_TOMORROW,
    LONG_AGO,
    UTC,
    add_users,
    run_day,
    send_day,
)
from retention_pipeline_tests.test_outcomes import evaluate

D = date(2026, 11, 10)
FIRST, FOLLOW_UP, LAST_CALL = TEMPLATE_VARIANTS


def document_for(
    url: str,
    *,
    holdout: float = 0.5,
    salt: str | None = None,
    step_holdout: float = 0.1,
    variants: tuple[str, ...] = ("a", "b"),
    templates: tuple[str, ...] = (FIRST, FOLLOW_UP, LAST_CALL),
) -> dict:
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    loop = document["loops"][0]
    loop["name"] = "loop_0"
    loop["steps"][0]["condition"] = {"type": "segment", "segment": "dormant"}
    loop["steps"][0]["action"]["variants"] = list(variants)
    for step, template in zip(loop["steps"], templates, strict=True):
        step["action"]["template"] = template
    loop["holdout"] = {"fraction": holdout, **({"salt": salt} if salt else {})}
    loop["step_holdout"] = step_holdout
    return document


def config_for(url: str, **design):
    return parse_config(document_for(url, **design), environ={})


@pytest.fixture
def world(app_database_url):
    engine = create_engine(app_database_url)
    install(engine, config_for(app_database_url))
    yield engine, app_database_url
    engine.dispose()


def rows_of(engine, day: date) -> dict[str, tuple]:
    """The loop's audience of `day`: per user, (step, template, arm, variant, period)."""
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT user_id, step, template, arm, variant, period "
                "FROM retention.reengagement_audience WHERE partition_date = :day"
            ),
            {"day": day},
        ).all()
    return {row[0]: tuple(row[1:]) for row in rows}


def loop_periods(engine):
    with engine.connect() as connection:
        return periods(connection, "retention", "loop_0")


def step_rows(engine, config, period: int, *, through: date) -> dict[tuple, tuple[int, int]]:
    """The period's step and variant lines of the 7-day window: (treated, holdout) assigned."""
    (recorded,) = [p for p in loop_periods(engine) if p.number == period]
    with engine.connect() as connection:
        rows = performance_rows(
            connection,
            "retention",
            period_loop(config.loops[0], recorded),
            through=through,
            period=period,
        )
    return {
        (row.step, row.template, row.variant): (row.treatment.assigned, row.holdout.assigned)
        for row in rows
        if row.step is not None and row.window_days == 7
    }


# A user's last visit that makes them dormant from `day` on (seven days without activity).
def materialize_day(assets, instance, config_path, day: date) -> dg.ExecuteInProcessResult:
    """The assets' partition of `day`, as configured by the file at `config_path` when run."""
    return dg.materialize(
        assets,
        partition_key=day.isoformat(),
        instance=instance,
        resources={"app_database": AppDatabase(config_path=str(config_path))},
        raise_on_error=False,
    )


def dormant_from(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC) - timedelta(days=7)


def test_rebuilding_an_emailed_day_under_another_holdout_is_refused_and_moves_nobody(world):
    engine, url = world
    add_users(engine, range(1, 81), last_seen=LONG_AGO)
    config = config_for(url, holdout=0.5)
    run_day(engine, config, D)
    with serve_fake_resend() as fake:
        send_day(engine, config, D)
        emailed = sorted(fake.delivered_to())
    before = rows_of(engine, D)
    assert emailed == sorted(
        f"user{user}@example.com" for user, row in before.items() if row[2] == "treatment"
    )

    for changed, key in (
        (config_for(url, holdout=0.2), "loops.0.holdout.fraction: 0.5 -> 0.2"),
        (config_for(url, holdout=0.5, salt="another"), "loops.0.holdout.salt: changed"),
        (config_for(url, holdout=0.5, step_holdout=0.3), "loops.0.step_holdout: 0.1 -> 0.3"),
    ):
        with pytest.raises(ValueError) as refused:
            run_day(engine, changed, D)
        message = str(refused.value)
        assert message.startswith(f"{key} since period 1, from {D}") and "\n" not in message
        # Nobody emailed moved to the holdout, nobody held out to the treatment.
        assert rows_of(engine, D) == before
    assert [p.number for p in loop_periods(engine)] == [1]
    # The configured design builds the day again, the same.
    run_day(engine, config, D)
    assert rows_of(engine, D) == before


def test_a_new_holdout_fraction_starts_a_period_and_open_episodes_keep_theirs(world):
    engine, url = world
    add_users(engine, range(1, 81), last_seen=LONG_AGO)
    run_day(engine, config_for(url, holdout=0.5), D)
    first = rows_of(engine, D)
    later = D + timedelta(days=3)
    add_users(engine, range(101, 181), last_seen=dormant_from(later))
    changed = config_for(url, holdout=0.2)

    run_day(engine, changed, later)

    first_period, second_period = loop_periods(engine)
    assert (second_period.number, second_period.started_on) == (2, later)
    assert second_period.change == "loops.0.holdout.fraction: 0.5 -> 0.2"
    assert first_period.design["holdout"]["fraction"] == 0.5
    rows = rows_of(engine, later)
    # The episodes of period 1 get their follow-up in period 1, each in its arm (the step
    # holdout may withhold a treated episode's follow-up).
    for user, (_, _, arm, _, _) in first.items():
        template, follow_up_arm, variant, period = rows[user][1:]
        assert (template, variant, period) == (FOLLOW_UP, "a", 1)
        assert follow_up_arm in ({"holdout"} if arm == "holdout" else {"treatment", "withheld"})
    started = {user: row for user, row in rows.items() if int(user) > 100}
    assert len(started) == 80 and {row[4] for row in started.values()} == {2}
    assert 0.05 < sum(row[2] == "holdout" for row in started.values()) / 80 < 0.4

    evaluate(engine, changed, later + timedelta(days=8))
    by_arm = lambda rows, step, control="holdout": (  # noqa: E731
        sum(r[2] == "treatment" for r in rows.values() if r[0] == step),
        sum(r[2] == control for r in rows.values() if r[0] == step),
    )
    old_follow_ups = {user: rows[user] for user in first}
    treated, held = by_arm(first, 0)
    # A variant is measured against its step's whole holdout.
    assert step_rows(engine, changed, 1, through=later) == {
        (0, FIRST, None): (treated, held),
        (0, FIRST, "a"): (sum(r[3] == "a" for r in first.values() if r[2] == "treatment"), held),
        (0, FIRST, "b"): (sum(r[3] == "b" for r in first.values() if r[2] == "treatment"), held),
        (1, FOLLOW_UP, None): by_arm(old_follow_ups, 1, "withheld"),
    }
    second = step_rows(engine, changed, 2, through=later)
    assert second[(0, FIRST, None)] == by_arm(started, 0)
    assert {scope[:2] for scope in second} == {(0, FIRST)}


def test_a_day_before_the_first_period_belongs_to_it_not_to_the_latest(world):
    """A backfill of a day before the loop's first audience, under the design of a later
    period, must not move that period's start before the first's."""
    engine, url = world
    add_users(engine, range(1, 41), last_seen=LONG_AGO)
    run_day(engine, config_for(url, holdout=0.5), D)
    changed = config_for(url, holdout=0.2)
    run_day(engine, changed, D + timedelta(days=3))

    with pytest.raises(ValueError, match="since period 1"):
        run_day(engine, changed, D - timedelta(days=2))

    assert [(p.number, p.started_on) for p in loop_periods(engine)] == [
        (1, D),
        (2, D + timedelta(days=3)),
    ]


def test_reordered_steps_start_a_period_and_a_pause_stays_with_its_step(world):
    engine, url = world
    add_users(engine, range(1, 41), last_seen=LONG_AGO)
    config = config_for(url)
    run_day(engine, config, D)
    # Period 1 pauses its follow-up (step 1).
    with engine.begin() as connection:
        store_decisions(
            connection,
            "retention",
            config.loops[0],
            D,
            [Decision(1, D, {"a": 1.0}, True, "paused: the follow-up does harm", {})],
        )
    add_users(engine, range(101, 141), last_seen=DORMANT_FROM_TOMORROW)
    reordered = config_for(url, templates=(FIRST, LAST_CALL, FOLLOW_UP))

    run_day(engine, reordered, D + timedelta(days=1))

    assert loop_periods(engine)[1].change == (
        f"loops.0.steps: {FIRST}, {FOLLOW_UP}, {LAST_CALL} -> {FIRST}, {LAST_CALL}, {FOLLOW_UP}; "
        "loops.0.steps.1.delay: 7d -> 3d; loops.0.steps.2.delay: 3d -> 7d"
    )
    # The performance of that day, as the daily asset measures and decides it: period 2 has no
    # outcomes yet, so it decides nothing and period 1's pause stays with the follow-up.
    with engine.begin() as connection:
        rows, decided = decide_day(connection, "retention", reordered.loops[0], D + timedelta(1))
    assert rows == [] and decided == []
    with engine.connect() as connection:
        in_force = decisions_in_force(
            connection,
            "retention",
            period_loop(reordered.loops[0], loop_periods(engine)[1]),
            D + timedelta(days=2),
            2,
        )
    assert {step: decision.paused for step, decision in in_force.items()} == {2: True}
    # Period 1's episodes keep period 1's steps: their follow-up, three days in, is paused.
    summary = run_day(engine, reordered, D + timedelta(days=3))
    assert summary.excluded["step_paused"] == 40 and not rows_of(engine, D + timedelta(days=3))
    # Period 2's step 1 is the last call, which nobody paused.
    run_day(engine, reordered, D + timedelta(days=4))
    assert {row[:2] + row[4:] for row in rows_of(engine, D + timedelta(days=4)).values()} == {
        (1, LAST_CALL, 2)
    }
    assert len(rows_of(engine, D + timedelta(days=4))) == 40
    # Period 1's last call is still its step 2, and goes out as the last call.
    run_day(engine, reordered, D + timedelta(days=7))
    assert {row[:2] + row[4:] for row in rows_of(engine, D + timedelta(days=7)).values()} == {
        (2, LAST_CALL, 1)
    }
    with serve_fake_resend():
        send_day(engine, reordered, D + timedelta(days=7))
    with engine.connect() as connection:
        subjects = connection.execute(
            text(
                "SELECT DISTINCT subject FROM retention.email_send_log "
                "WHERE partition_date = :day AND status = 'sent'"
            ),
            {"day": D + timedelta(days=7)},
        ).scalars()
        assert set(subjects) == {"Should we stop emailing you?"}
    # Period 2's follow-up, a week in, carries the pause with it (period 1's, long due, still
    # counts as paused too).
    summary = run_day(engine, reordered, D + timedelta(days=8))
    assert summary.excluded["step_paused"] == 80 and not rows_of(engine, D + timedelta(days=8))


def test_a_pause_the_new_period_decides_holds_for_the_open_episodes_of_the_old(world):
    """Period 1's episodes keep period 1's steps until they end; a follow-up that period 2's
    outcomes find harmful is not sent to them meanwhile."""
    engine, url = world
    add_users(engine, range(1, 41), last_seen=LONG_AGO)
    config = config_for(url)
    run_day(engine, config, D)
    add_users(engine, range(101, 141), last_seen=DORMANT_FROM_TOMORROW)
    reordered = config_for(url, templates=(FIRST, LAST_CALL, FOLLOW_UP))
    run_day(engine, reordered, D + timedelta(days=1))
    period_2 = period_loop(reordered.loops[0], loop_periods(engine)[1])
    with engine.begin() as connection:
        store_decisions(
            connection,
            "retention",
            period_2,
            D + timedelta(days=2),
            [Decision(2, D + timedelta(days=2), {"a": 1.0}, True, "paused: harmful", {})],
        )

    # Period 1's follow-up is its step 1, due three days in.
    summary = run_day(engine, reordered, D + timedelta(days=3))
    assert summary.excluded["step_paused"] == 40 and not rows_of(engine, D + timedelta(days=3))


def test_a_step_taken_out_is_sent_to_nobody_even_in_episodes_that_started_with_it(world):
    engine, url = world
    add_users(engine, range(1, 21), last_seen=LONG_AGO)
    run_day(engine, config_for(url), D)
    document = document_for(url)
    del document["loops"][0]["steps"][2]
    shortened = parse_config(document, environ={})

    run_day(engine, shortened, D + timedelta(days=3))
    summary = run_day(engine, shortened, D + timedelta(days=7))

    assert loop_periods(engine)[1].change == (
        f"loops.0.steps: {FIRST}, {FOLLOW_UP}, {LAST_CALL} -> {FIRST}, {FOLLOW_UP}"
    )
    assert {row[:2] + row[4:] for row in rows_of(engine, D + timedelta(days=3)).values()} == {
        (1, FOLLOW_UP, 1)
    }
    assert summary.excluded["step_paused"] == 20 and not rows_of(engine, D + timedelta(days=7))


def test_another_variant_starts_a_period_and_report_shows_one_period_at_a_time(
    world, tmp_path, capsys
):
    engine, url = world
    path = tmp_path / "retention.yaml"
    path.write_text(yaml.safe_dump(document_for(url, variants=("a", "b"))))
    add_users(engine, range(1, 61), last_seen=LONG_AGO)
    run_day(engine, config_for(url, variants=("a", "b")), D)
    path.write_text(yaml.safe_dump(document_for(url, variants=("b",))))
    changed = config_for(url, variants=("b",))
    add_users(engine, range(101, 161), last_seen=DORMANT_FROM_TOMORROW)
    run_day(engine, changed, D + timedelta(days=1))
    assert loop_periods(engine)[1].change == "loops.0.steps.0.action.variants: a, b -> b"
    assert {row[3] for row in rows_of(engine, D + timedelta(days=1)).values()} == {"b"}
    evaluate(engine, changed, D + timedelta(days=9))

    first = step_rows(engine, changed, 1, through=D + timedelta(days=9))
    second = step_rows(engine, changed, 2, through=D + timedelta(days=9))
    assert sum(first[(0, FIRST, None)]) == sum(second[(0, FIRST, None)]) == 60
    assert {scope[2] for scope in first} == {None, "a", "b"} and set(second) == {(0, FIRST, None)}

    assert main(["--config", str(path), "report"]) == 0
    current = capsys.readouterr().out
    assert main(["--config", str(path), "report", "--period", "1"]) == 0
    earlier = capsys.readouterr().out
    assert f"experiment period 2, from {D + timedelta(days=1)} (loops.0.steps.0." in current
    assert "of 2: see --period" in current and "/ a" not in current
    assert f"experiment period 1, from {D} (the first design)" in earlier
    assert "step 0 re_engagement / a" in earlier and "step 0 re_engagement / b" in earlier
    assert main(["--config", str(path), "report", "--period", "3"]) == 2
    assert capsys.readouterr().err.strip() == "error: --period: loop_0 has no period 3 (it has 2)"


def test_a_variant_without_copy_of_its_own_is_refused_in_one_line(tmp_path, capsys):
    document = document_for("postgresql://nowhere/db", variants=("a", "c"))
    with pytest.raises(ConfigError, match=r"loops\.0\.steps\.0\.action\.variants: variant 'c'"):
        parse_config(document, environ={})
    path = tmp_path / "retention.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["--config", str(path), "check"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"error: {path}: loops.0.steps.0.action.variants: variant 'c' has no copy in template "
        "'re_engagement', which would send it variant 'a''s words (its variants: a, b)"
    )
    with pytest.raises(ConfigError, match=r"loops\.0: steps\.2\.action\.template: 're_engage"):
        parse_config(
            document_for("postgresql://nowhere/db", templates=(FIRST, FOLLOW_UP, FIRST)),
            environ={},
        )


def test_every_variant_a_template_declares_has_words_of_its_own() -> None:
    for template, variants in TEMPLATE_VARIANTS.items():
        subjects = {render_email(template, context(variant=v)).subject for v in variants}
        assert len(subjects) == len(variants), template


def test_the_audience_asset_refuses_a_changed_holdout_for_an_assigned_day_in_one_line(
    create_database, tmp_path
):
    url = create_database()
    engine, day = demo_until_yesterday(url)
    path = write_config(tmp_path, url)
    assets = daily_assets("user_activity_snapshot", "engagement_segments", "reengagement_audience")
    with dg.instance_for_test() as instance:
        assert materialize_day(assets, instance, path, day).success
        before = rows_of(engine, day)
        document = yaml.safe_load(path.read_text())
        document["loops"][0]["holdout"]["fraction"] = 0.3
        path.write_text(yaml.safe_dump(document))

        result = materialize_day(assets, instance, path, day)

    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("loops.0.holdout.fraction: 0.1 -> 0.3 since period 1, from ")
    assert "\n" not in description
    assert before and rows_of(engine, day) == before
    engine.dispose()


def test_an_upgraded_database_keeps_its_assignments_and_decisions_in_period_1(world):
    engine, url = world
    add_users(engine, range(1, 41), last_seen=LONG_AGO)
    config = config_for(url)
    run_day(engine, config, D)
    run_day(engine, config, D + timedelta(days=3))
    # Back to the revision before periods: the assignments stay, without periods; its pipeline
    # pauses the follow-up by its index (step 1).
    with engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, "retention"), "0014-1")
    with engine.begin() as connection:
        connection.execute(
            text("""
                INSERT INTO retention.campaign_decisions (loop_name, step, decided_on,
                    variant_shares, paused, reason, evidence)
                VALUES ('loop_0', 1, :day, '{"a": 1.0}', true, 'paused', '{}')"""),
            {"day": D + timedelta(days=3)},
        )

    install(engine, config)

    with engine.connect() as connection:
        assert connection.execute(
            text("SELECT period, step_id, step FROM retention.campaign_decisions")
        ).all() == [(1, FOLLOW_UP, 1)]
    add_users(engine, range(101, 141), last_seen=dormant_from(D + timedelta(days=4)))
    run_day(engine, config, D + timedelta(days=4))
    (period,) = loop_periods(engine)
    assert (period.number, period.started_on, period.change) == (1, D, "the first design")
    # The new episodes' follow-up is paused; the old episodes get their last call.
    summary = run_day(engine, config, D + timedelta(days=7))
    assert summary.excluded["step_paused"] == 40
    assert {row[:2] + row[4:] for row in rows_of(engine, D + timedelta(days=7)).values()} == {
        (2, LAST_CALL, 1)
    }


def test_a_reinstall_keeps_the_periods_its_episodes_follow(world, tmp_path, capsys):
    engine, url = world
    add_users(engine, range(1, 21), last_seen=LONG_AGO)
    run_day(engine, config_for(url), D)
    templates = (FIRST, LAST_CALL, FOLLOW_UP)
    reordered = config_for(url, templates=templates)
    run_day(engine, reordered, D + timedelta(days=1))
    path = tmp_path / "retention.yaml"
    path.write_text(yaml.safe_dump(document_for(url, templates=templates)))

    assert main(["--config", str(path), "db", "uninstall", "--yes"]) == 0
    assert (
        "  kept 2 experiment period(s) in retention.experiment_periods_kept\n"
        in capsys.readouterr().out
    )
    install(engine, reordered)

    assert [period.number for period in loop_periods(engine)] == [1, 2]
    # Period 1's episodes still get period 1's follow-up, three days in.
    run_day(engine, reordered, D + timedelta(days=3))
    assert {row[:2] + row[4:] for row in rows_of(engine, D + timedelta(days=3)).values()} == {
        (1, FOLLOW_UP, 1)
    }


def writing_transactions(engine, day: date) -> dict[str, int]:
    """Per loop, the newest transaction that wrote its audience rows of `day`."""
    with engine.connect() as connection:
        return dict(
            connection.execute(
                text(
                    "SELECT loop_name, max(xmin::text::bigint) "
                    "FROM retention.reengagement_audience WHERE partition_date = :day "
                    "GROUP BY loop_name"
                ),
                {"day": day},
            ).all()
        )


def test_a_refused_loop_leaves_the_days_other_loops_unbuilt_and_says_so(create_database, tmp_path):
    url = create_database()
    engine, day = demo_until_yesterday(url)
    path = write_config(tmp_path, url)
    document = yaml.safe_load(path.read_text())
    second = copy.deepcopy(document["loops"][0])
    second["name"] = "second_loop"
    second["steps"][0]["condition"] = {"type": "segment", "segment": "dormant"}
    document["loops"].append(second)
    path.write_text(yaml.safe_dump(document))
    first = document["loops"][0]["name"]
    assets = daily_assets("user_activity_snapshot", "engagement_segments", "reengagement_audience")
    with dg.instance_for_test() as instance:
        assert materialize_day(assets, instance, path, day).success
        built_at = writing_transactions(engine, day)
        assert set(built_at) == {first, "second_loop"}
        document["loops"][1]["holdout"]["fraction"] = 0.3
        path.write_text(yaml.safe_dump(document))

        result = materialize_day(assets, instance, path, day)

    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("loops.1.holdout.fraction: 0.1 -> 0.3 since period 1, from ")
    assert description.endswith(
        f"; no audience of {day} was built for the other loops ({first}): "
        "the audience op's `loops` setting can leave the refused loop out"
    )
    assert "\n" not in description
    # The first loop was built again before the second was refused, and that was rolled back:
    # its rows are the ones the first run wrote.
    assert writing_transactions(engine, day) == built_at
    engine.dispose()
