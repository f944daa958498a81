"""`retention-pipeline dev` on a fresh machine: the embedded PostgreSQL, demo data, the Dagster UI
with the asset graph, no second `dev` on the same home, and a clean stop on SIGTERM that leaves
no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

ASSETS_QUERY = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()


def alive(process: psutil.Process) -> bool:
    # Orphans are reparented to PID 1, which in a container may never reap them: a zombie has
    # exited all the same.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def asset_paths(port: int) -> list[str] | None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=ASSETS_QUERY,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            nodes = json.load(response)["data"]["assetNodes"]
    except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, TypeError):
        return None
    return sorted("/".join(node["assetKey"]["path"]) for node in nodes) or None


def dev_environment(home: Path) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RETENTION_DATABASE_URL", "DAGSTER_HOME", "RETENTION_CONFIG")
    }
    environment["RETENTION_HOME"] = str(home)
    return environment


@pytest.fixture
def dev_process(embedded_home: Path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "retention_pipeline.cli", "dev", "--port", str(port)],
        env=dev_environment(embedded_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    yield process, port, embedded_home
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# SIGHUP: the terminal `dev` ran in closed.
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_dev_serves_the_asset_graph_refuses_a_second_dev_and_stops_cleanly(dev_process, stop):
    process, port, home = dev_process
    deadline = time.monotonic() + 240
    paths = None
    while time.monotonic() < deadline and process.poll() is None and paths is None:
        time.sleep(2)
        paths = asset_paths(port)
    assert paths is not None, process.stdout.read() if process.poll() is not None else "no answer"
    assert "app/activity/events" in paths
    assert "retention/activity_rollup" in paths
    assert (home / "pgdata" / "PG_VERSION").exists()
    assert (home / "dagster_home" / "dagster.yaml").exists()

    postmaster = (home / "pgdata" / "postmaster.pid").read_text().split()[0]

    # A second `dev` on the same home refuses in one line, and leaves the first one working.
    second = subprocess.run(
        [sys.executable, "-m", "retention_pipeline.cli", "dev", "--port", str(free_port())],
        env=dev_environment(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert second.stderr == (
        f"error: retention-pipeline dev already runs (pid {process.pid}) at "
        f"http://127.0.0.1:{port}: use that one, or stop it first\n"
    )
    assert alive(psutil.Process(int(postmaster)))
    assert asset_paths(port) == paths

    started = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(stop)
    output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output
    assert "demo data seeded" in output
    # Nothing the user can do anything about: no Dagster deprecation or beta warning.
    assert "Warning" not in output and "dagster.yaml file will not be used" not in output
    assert "stopped the embedded PostgreSQL" in output
    survivors = [child for child in started if alive(child)]
    assert survivors == []
    assert not psutil.pid_exists(int(postmaster)) or not alive(psutil.Process(int(postmaster)))


def stop_tree(process: subprocess.Popen) -> None:
    """Kill `process` and every process under it, `dagster dev`'s own process group included."""
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait()


def processes_of(home: Path) -> list[psutil.Process]:
    """Live processes that `dev` on `home` started (their command lines name its folders)."""
    found = []
    for candidate in psutil.process_iter(["cmdline"]):
        if str(home) in " ".join(candidate.info["cmdline"] or []) and alive(candidate):
            found.append(candidate)
    return found


def test_dev_on_a_busy_port_stops_at_once_in_one_line(embedded_home: Path):
    from retention_pipeline.database import embedded

    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "retention_pipeline.cli", "dev", "--port", str(port)],
            env=dev_environment(embedded_home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _, stderr = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            running = [" ".join(member.cmdline()[:4]) for member in processes_of(embedded_home)]
            stop_tree(process)
            embedded.stop(embedded_home)
            pytest.fail(f"dev kept running on a busy port: {running}")

    assert process.returncode == 2
    assert stderr == (
        f"error: port {port} on 127.0.0.1 is already in use: stop what listens there, or start "
        "dev on another one (--port)\n"
    )
    assert processes_of(embedded_home) == []
    assert not embedded.is_running(embedded_home)


def test_dev_stops_everything_when_its_webserver_dies(dev_process):
    process, port, home = dev_process
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and asset_paths(port) is None:
        time.sleep(2)
    assert asset_paths(port) is not None, "the UI never answered"
    started = psutil.Process(process.pid).children(recursive=True)
    (webserver,) = [child for child in started if "dagster_webserver" in " ".join(child.cmdline())]

    webserver.kill()
    output, _ = process.communicate(timeout=120)

    assert process.returncode == 1, output
    stopped = [line for line in output.splitlines() if "dagster dev stopped by itself" in line]
    assert len(stopped) == 1 and stopped[0].startswith("error: dagster dev stopped by itself (")
    assert "stopped the embedded PostgreSQL" in output
    assert [child for child in started if alive(child)] == []
    assert not (home / "pgdata" / "postmaster.pid").exists()
