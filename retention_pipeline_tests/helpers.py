"""Shared test helpers: configurations pointing at a test database."""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from retention_pipeline.config import RetentionConfig, parse_config
from retention_pipeline.config.loader import project_root
from retention_pipeline.database.connection import create_app_engine
from retention_pipeline.defs import build_definitions
from retention_pipeline.demo import seed_demo
from retention_pipeline.tracking.install import install

SHIPPED_DOCUMENT = yaml.safe_load((project_root() / "retention.yaml").read_text())
TEST_UNSUBSCRIBE_SECRET = "unsubscribe-secret-for-tests"
# What a configuration outside the demo must give its emails (the shipped file's are the demo's
# placeholders, which `check` and the send refuse there).
TEST_EMAIL_IDENTITY = {
    "from": "Northwind Notes <hello@northwind-notes.com>",
    "product_name": "Northwind Notes",
    "app_url": "https://app.northwind-notes.com",
    "unsubscribe_url": "https://app.northwind-notes.com/unsubscribe",
    "company_address": "Northwind Notes Ltd., 12 Harbour Road, Leith",
}
SHIPPED_CONFIG = parse_config(SHIPPED_DOCUMENT, environ={})


@functools.cache
def shipped_definitions() -> dg.Definitions:
    """The definitions of the shipped configuration, built as the code location builds them."""
    return build_definitions(SHIPPED_CONFIG)


# The definitions' own assets, jobs and sensors, before Dagster binds the definitions' resources
# to them: each test binds its own.
def shipped_asset(key: dg.AssetKey) -> dg.AssetsDefinition:
    (asset,) = [
        asset
        for asset in shipped_definitions().assets or ()
        if isinstance(asset, dg.AssetsDefinition) and asset.key == key
    ]
    return asset


def shipped_job(name: str) -> dg.JobDefinition:
    (job,) = [job for job in shipped_definitions().jobs or () if job.name == name]
    return job


def shipped_sensor(name: str) -> dg.SensorDefinition:
    (sensor,) = [sensor for sensor in shipped_definitions().sensors or () if sensor.name == name]
    return sensor


def make_config(url: str, *, timezone: str = "UTC", **database: Any) -> RetentionConfig:
    """The shipped configuration, pointed at `url`, with database settings overridden."""
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"].update(database)
    document["database"]["url"] = url
    for loop in document["loops"]:
        loop["steps"][0]["trigger"]["timezone"] = timezone
    return parse_config(document, environ={})


def write_config(
    directory: Path, url: str, *, email: dict[str, Any] | None = None, **database: Any
) -> Path:
    """Write the shipped configuration, pointed at `url`, to a file; return its path. Its emails
    go to the outbox under `directory`, from `TEST_EMAIL_IDENTITY`, with links signed by
    `TEST_UNSUBSCRIBE_SECRET`, unless `email` says otherwise."""
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"].update(database)
    document["email"].update(TEST_EMAIL_IDENTITY)
    document["email"]["provider"] = "outbox"
    document["email"]["unsubscribe_secret"] = TEST_UNSUBSCRIBE_SECRET
    document["email"].update(email or {})
    for loop in document["loops"]:  # the seed's per-step provider must be email.provider
        for step in loop["steps"]:
            step["action"]["provider"] = document["email"]["provider"]
    document["database"]["url"] = url
    document["email"]["outbox_dir"] = str(directory / "outbox")
    path = directory / "retention.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def insert_sent_email(engine: Engine, user_id: str, key: str, status: str = "sent") -> None:
    """A send-log row of the shipped loop for `user_id`, with content naming the user."""
    with engine.begin() as connection:
        connection.execute(
            text("""
                INSERT INTO retention.email_send_log
                    (send_key, loop_name, user_id, episode_start, step, partition_date, email,
                     template, variant, batch_key, subject, html, body_text, status)
                VALUES (:key, 're_engagement', :user, '2026-11-20', 0, '2026-11-20',
                        :email, 're_engagement', 'a', 'batch-1', 'We miss you, ' || :user,
                        '<p>Hi ' || :user || '</p>', 'Hi', :status)"""),
            {"key": key, "user": user_id, "email": f"user{user_id}@example.com", "status": status},
        )


def demo_until_yesterday(url: str) -> tuple[Engine, date]:
    """The demo app's history (400 users, 60 days) up to the end of yesterday in the database at
    `url`, with the pipeline installed; returns an engine on it, and yesterday."""
    engine = create_engine(url)
    day = datetime.now(UTC).date() - timedelta(days=1)
    with engine.begin() as connection:
        seed_demo(
            connection,
            users=400,
            days=60,
            seed=11,
            end=datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC),
        )
    install(engine, make_config(url))
    return engine, day


def treated(engine: Engine, day: str) -> set[str]:
    """The users of the audience of `day` (YYYY-MM-DD) in the treatment arm."""
    with engine.connect() as connection:
        return set(
            connection.execute(
                text(
                    "SELECT user_id FROM retention.reengagement_audience "
                    "WHERE partition_date = :day AND arm = 'treatment'"
                ),
                {"day": day},
            ).scalars()
        )


def daily_assets(*names: str) -> list[dg.AssetsDefinition]:
    """The code location's own assets `retention/NAME`, unbound: each test binds its resources."""
    from retention_pipeline.definitions import defs  # loaded on first use: few tests need it

    assets = [asset for asset in defs.assets or () if isinstance(asset, dg.AssetsDefinition)]
    by_key = {asset.key: asset for asset in assets}
    return [by_key[dg.AssetKey(["retention", name])] for name in names]


@contextmanager
def login_role(owner: Engine, url: str, grants: Sequence[str]) -> Iterator[tuple[str, Engine]]:
    """A new login role, given `grants` (statements naming it `{role}`) by `owner`, and an app
    engine logged in as it at `url`'s database; the role and what it owns are dropped after."""
    role = f"rp_role_{uuid.uuid4().hex[:8]}"
    with owner.begin() as connection:
        connection.execute(text(f"CREATE ROLE {role} LOGIN"))
        for grant in grants:
            connection.execute(text(grant.format(role=role)))
    engine = create_app_engine(make_url(url).set(username=role).render_as_string())
    try:
        yield role, engine
    finally:
        engine.dispose()
        with owner.begin() as connection:
            connection.execute(text(f"DROP OWNED BY {role}"))
            connection.execute(text(f"DROP ROLE {role}"))


def audience_tables_vacuumed(engine: Engine) -> dict[str, bool]:
    """Per audience table, whether it was vacuumed and analyzed (not by autovacuum)."""
    with engine.connect() as connection:
        return dict(
            connection.execute(
                text("""SELECT relname, last_vacuum IS NOT NULL AND last_analyze IS NOT NULL
                        FROM pg_stat_user_tables WHERE schemaname = 'retention'
                          AND relname IN ('episodes', 'reengagement_audience')""")
            ).all()
        )


def drain_command(url: str, config_path: Path) -> list[str]:
    """The command of a drain of the configuration at `config_path` in a process of its own
    (`tracking_worker`), for a test or a benchmark to run or kill."""
    return [
        sys.executable,
        "-m",
        "retention_pipeline_tests.tracking_worker",
        "drain",
        url,
        str(config_path),
    ]


def kill_mid_poll(engine: Engine, url: str, config_path: Path, lock_mode: str) -> None:
    """Start a drain and SIGKILL it where its poll waits on `lock_mode`, which this connection
    holds on `polled_rows` until then: ACCESS EXCLUSIVE stops the poll's read of what it
    counted, SHARE lets it read and fold into the rollup and stops its record of the rows it
    counted, in the same transaction."""
    with engine.connect() as holder:
        holder.execute(text(f"LOCK TABLE retention.polled_rows IN {lock_mode} MODE"))
        worker = subprocess.Popen(
            drain_command(url, config_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            with engine.connect() as watcher:
                deadline = time.monotonic() + 60
                while not watcher.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database() AND query LIKE '%polled_rows%' "
                        "AND pid <> pg_backend_pid()"
                    )
                ).scalar():
                    if worker.poll() is not None:
                        raise RuntimeError("the drain ended without polling")
                    if time.monotonic() > deadline:
                        raise RuntimeError("the drain never reached its poll")
                    watcher.rollback()
                    time.sleep(0.01)
        finally:
            worker.kill()
            worker.wait()
        holder.rollback()
