"""`python -m benchmarks drain-layouts` at a tiny size: every layout folds every case (held days
too) into the same user-days and actions, and the report has a figure for each; never how fast
anything was."""

from __future__ import annotations

import pytest

from benchmarks import bench_drain_layouts


def test_every_layout_folds_the_same_rollup_and_is_reported(
    postgres_server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_drain_layouts.main(
        postgres_server_url, rows=3000, users=300, active=20, repeats=1, held=True
    )
    report = capsys.readouterr().out

    header = next(line for line in report.splitlines() if line.startswith("| | shipped |"))
    assert header.count("|") == 13
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    # Four folds and five readers, each under both headers' eleven layouts.
    assert len(rows) == 2 + 4 + 5
    for row in rows:
        assert row.count("|") == 13, row
