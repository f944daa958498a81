"""What `retention-pipeline dev` does around Dagster: bring the app database to a usable state
(the embedded demo, or a configured server), keep to one running `dev` per RETENTION_HOME, and
supervise `dagster dev`: start it only on a free port, and stop its whole process group (daemon,
webserver, code servers, run workers) and the embedded server together.

A second `dev` would fail to bind the port, start a second daemon on the same instance, and on
its way out stop the embedded PostgreSQL the first one uses."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.app_tables import table_sql
from retention_pipeline.database.connection import (
    create_app_engine,
    resolve_database_url,
    uses_embedded_database,
)
from retention_pipeline.tracking.install import InstallReport, install

DEMO_USERS = 2000
DEMO_DAYS = 120
DEMO_SEED = 42


@dataclass(frozen=True)
class PreparedDatabase:
    url: str
    engine: Engine
    seeded: bool
    install: InstallReport


def _has_users(engine: Engine, config: RetentionConfig) -> bool:
    users = config.database.tables.users
    with engine.connect() as connection:
        table = table_sql(users, connection.dialect.identifier_preparer)
        if connection.execute(text("SELECT to_regclass(:name)"), {"name": table}).scalar() is None:
            return False
        return connection.execute(text(f"SELECT EXISTS (SELECT FROM {table})")).scalar()


def prepare_database(config: RetentionConfig) -> PreparedDatabase:
    """Resolve the database, seed demo data into an empty embedded one, then install.

    A configured database is the user's own: it is never seeded."""
    url = resolve_database_url(config)
    engine = create_app_engine(url, config.database.statement_timeout)
    seeded = False
    if uses_embedded_database(config) and not _has_users(engine, config):
        from retention_pipeline.demo import EmailEffect, seed_demo

        with engine.begin() as connection:
            seed_demo(
                connection,
                users=DEMO_USERS,
                days=DEMO_DAYS,
                seed=DEMO_SEED,
                end=datetime.now(UTC).replace(microsecond=0),
                email_effect=EmailEffect.for_loop(config.loops[0]),
            )
        seeded = True
    report = install(engine, config, progress=lambda line: print(line, flush=True))
    return PreparedDatabase(url=url, engine=engine, seeded=seeded, install=report)


LOCK_FILE_NAME = "dev.lock"


class DevAlreadyRunning(ValueError):
    """Another `retention-pipeline dev` runs on the same RETENTION_HOME."""


def _holder_description(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text())
        return f"(pid {holder['pid']}) at {holder['url']}"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment from now
        return f"(it holds {lock_path})"


def running_dev(home: Path) -> str | None:
    """Describe the `dev` running on `home` (its pid and URL), or None when none runs.

    The lock is an flock the operating system releases when its holder dies, so a lock file a
    killed `dev` left behind counts as free."""
    lock_path = home / LOCK_FILE_NAME
    try:
        lock_file = lock_path.open()
    except FileNotFoundError:
        return None
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_description(lock_path)
    return None


@contextlib.contextmanager
def single_dev(home: Path, url: str) -> Iterator[None]:
    """Hold the `dev` lock of `home` (with this process's pid and `url` in it) while the block
    runs; raise DevAlreadyRunning, naming the holder, when another `dev` holds it."""
    home.mkdir(parents=True, exist_ok=True)
    lock_path = home / LOCK_FILE_NAME
    with lock_path.open("a+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DevAlreadyRunning(
                f"retention-pipeline dev already runs {_holder_description(lock_path)}: "
                "use that one, or stop it first"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(json.dumps({"pid": os.getpid(), "url": url}))
        lock_file.flush()
        try:
            yield
        finally:
            lock_file.seek(0)
            lock_file.truncate()


class PortInUse(ValueError):
    """The port `dev` would serve the UI on is taken."""


def require_free_port(host: str, port: int) -> None:
    """Raise PortInUse unless the webserver can listen on `host`:`port`.

    `dagster dev` does not stop when its webserver cannot bind: the daemon, the schedules and
    the sensor would go on sending with no UI. Bound as uvicorn binds (SO_REUSEADDR), so a port
    whose last connections linger in TIME_WAIT counts as free, as it is for the webserver."""
    family, kind, protocol, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise PortInUse(
                f"port {port} on {host} is already in use: stop what listens there, or start "
                "dev on another one (--port)"
            ) from None


def _restore_default_signals() -> None:
    # A child started from a background shell inherits SIGINT/SIGTERM as ignored; dagster dev
    # then never stops. Give it default handling and its own process group.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    os.setsid()


def run_until_signalled(command: list[str], environment: dict[str, str], cwd: Path) -> int:
    """Run `dagster dev` in its own process group until Ctrl-C, SIGTERM or SIGHUP, then stop the
    whole group and return 0. Should it end by itself, stop what is left of its group, say so in
    one line and return 1."""
    process = subprocess.Popen(
        command, env=environment, cwd=cwd, preexec_fn=_restore_default_signals
    )

    def forward(_signum, _frame) -> None:
        raise KeyboardInterrupt

    # SIGHUP: the terminal closed (or the SSH session dropped), which would otherwise end `dev`
    # alone and leave its own session of Dagster processes sending.
    stopping = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for signum in stopping:
        signal.signal(signum, forward)
    try:
        status = process.wait()
    except KeyboardInterrupt:
        for signum in stopping:
            signal.signal(signum, signal.SIG_IGN)
        with contextlib.suppress(OSError):  # no terminal left to say it to
            print("stopping dagster dev ...", flush=True)
        stop_group(process)
        return 0
    for signum in stopping:
        signal.signal(signum, signal.SIG_IGN)
    stop_group(process)
    print(
        f"error: dagster dev stopped by itself (exit status {status}; its output above says "
        "why): stopped the rest of its processes",
        file=sys.stderr,
    )
    return 1


def stop_group(process: subprocess.Popen) -> None:
    """Ask `process`'s group to stop (SIGINT: dagster dev shuts its services down), wait up to
    30 s for `process`, then kill whatever is left of the group."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    # Code servers and the daemon can outlive dagster dev itself: end the whole group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def stopping_the_embedded_server_at_the_end(config: RetentionConfig) -> Iterator[None]:
    """`dev` owns the embedded server while it runs (its lock keeps a second `dev` out): stop it
    when `dev` ends, however it ends."""
    from retention_pipeline.database import embedded

    try:
        yield
    finally:
        if uses_embedded_database(config) and embedded.stop():
            print("stopped the embedded PostgreSQL", flush=True)
