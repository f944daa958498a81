"""`python -m benchmarks run` end to end at a tiny size: real seeding, installs, Dagster runs in
the worker process, SQL floor and naive statements, capture loads and sending. Checks that the
report has every section, that its figures are numbers in a sane range and that the floor and
naive statements wrote the snapshot's figures; never how fast anything was."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks import bench_audience
from benchmarks.run import BACKFILL_DAYS, HISTORIES, Options, run, run_morning

# A row of the morning's parts: its name, its median and its range over the repeats.
PART_ROW = r"^\| [A-Za-z][^|]* \| ([0-9.]+) \| [0-9.]+–[0-9.]+ \|$"


def test_the_benchmark_writes_every_section_with_sane_figures(
    postgres_server_url: str, tmp_path: Path
) -> None:
    output = tmp_path / "RESULTS.md"
    run(
        Options(
            users=150,
            shapes=["wide"],
            repeats=1,
            server_url=postgres_server_url,
            output=output,
            growth_users=100,
            capture_seconds=0.3,
            emails=150,
            sources=False,  # test_benchmark_sources.py runs them at a size of their own
        )
    )
    report = output.read_text()

    assert report.startswith("# Benchmark results\n")
    for heading in (
        "## Machine",
        "## Targets",
        "## wide: 150 users",
        "### One partition",
        "### Growth with history",
        f"### {BACKFILL_DAYS}-day backfill",
        "### The morning's critical path",
        "### Memory and temp files",
        "### Capture",
        "## Audience step",
        "## Sending",
    ):
        assert f"\n{heading}" in report, heading
    assert (
        "Figures written by the SQL floor that differ from the snapshot's: 0 users; by the "
        "naive statement: 0" in report
    )
    for history in HISTORIES:
        assert f"| {history} days |" in report
    # The full build is the first day's, the next one is rolled forward, and so is every day
    # of the backfill.
    assert "| snapshot, full build |" in report and "| full |" in report
    assert "| snapshot, incremental |" in report and "| incremental |" in report
    assert "(snapshot builds: incremental)" in report

    targets = report.split("## Targets")[1].split("\n## ")[0]
    rows = [line for line in targets.splitlines() if line.startswith("| wide |")]
    assert len(rows) == 7  # the naive ratio has a target on the deep shape only
    for row in rows:
        measured = row.split("|")[3]
        value = float(re.match(r"\s*([0-9.]+)", measured).group(1))
        assert 0 <= value < 10_000, row
        assert row.rstrip(" |").endswith(("met", "**not met**")), row
    # The morning: every part of the critical path timed, adding up to the total, and the first
    # send run's emails accepted by the stand-in Resend.
    morning = report.split("### The morning's critical path")[1].split("\n### ")[0]
    path, beside = morning.split("does not wait for")
    total = float(re.search(r"first email accepted\*\* \| \*\*([0-9.]+)\*\*", path)[1])
    parts = [float(value) for value in re.findall(PART_ROW, path, re.M)]
    assert len(parts) == 7
    assert 0 < sum(parts) <= total + 0.1  # the parts are rounded to 0.01 s each
    # The steps run beside the send: the rollup's reconciliation, outcomes and performance.
    beside_steps = re.findall(r"^\| ([a-z][^|]*) \| ([0-9.]+) \| [0-9.]+–[0-9.]+ \|$", beside, re.M)
    assert [step for step, _ in beside_steps] == [
        "rollup reconciliation (check)",
        "outcomes",
        "performance",
    ]
    assert all(float(seconds) > 0 for _, seconds in beside_steps)
    assert int(re.search(r"the first sent ([0-9,]+) emails", morning)[1].replace(",", "")) > 0
    rss = next(row for row in rows if "peak RSS" in row)
    assert 20 < float(rss.split("|")[3].split()[0]) < 4096  # MiB: a Python process with Dagster
    assert re.search(r"\| throttled at 2 requests/s \| [0-9]+ emails/s", report)


def test_the_audience_benchmark_builds_every_loop_over_a_history_that_takes_every_path(
    postgres_server_url: str,
) -> None:
    figures = bench_audience.measure_scratch(postgres_server_url, users=10_000, repeats=2)

    assert list(figures.summaries) == ["re_engagement", "re_engagement_2", "re_engagement_3"]
    assert len(figures.seconds) == len(figures.snapshot_seconds) == 2
    assert len(figures.against_snapshot) == 2
    assert set(figures.open_episodes.values()) == {300}
    assert all(figures.assigned.values())
    summaries = figures.summaries.values()
    for arm in ("treatment", "holdout", "withheld", "returned"):
        assert sum(getattr(summary, arm) for summary in summaries), arm
    assert {step for summary in summaries for step in summary.by_step} == {0, 1, 2}
    for reason in ("no_email", "suppressed", "shared_address", "frequency_cap", "cooldown"):
        assert sum(summary.excluded[reason] for summary in summaries), reason
    assert "| 10,000 | all 3 loops |" in bench_audience.render([figures])


def test_the_morning_benchmark_runs_the_same_morning_on_each_copy(
    postgres_server_url: str, tmp_path: Path
) -> None:
    output = tmp_path / "RESULTS-morning.md"
    run_morning(
        Options(
            users=150,
            shapes=["wide"],
            repeats=2,
            server_url=postgres_server_url,
            output=output,
            growth_users=0,
            capture_seconds=0,
            emails=0,
        )
    )
    report = output.read_text()

    # Both repeats sent the same first batch (checked by the benchmark, which stops otherwise),
    # each on its own copy of the database the history left.
    assert "The same morning was run 2 times, each on its own copy" in report
    assert re.search(r"send runs in every repeat; the first sent [1-9][0-9,]* emails", report)
    assert len(re.findall(PART_ROW, report, re.M)) == 7 + 3
    assert re.search(r"audience step / snapshot step \(3 loops\): [0-9.]+ x", report)
