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

    lines = report.splitlines()
    compacting = lines.index("| | recent deltas unindexed, compacted days |")
    header = next(line for line in lines if line.startswith("| | shipped |"))
    assert header.count("|") == 14
    rows = [line for line in lines[:compacting] if line.startswith("| ") and "---" not in line]
    # Four folds and five readers, each under both headers' twelve layouts.
    assert len(rows) == 2 + 4 + 5
    for row in rows:
        assert row.count("|") == 14, row
    # The compacting layout's compaction of the worst case, into new days and into held ones.
    compactions = [line for line in lines[compacting + 2 :] if line.startswith("| compaction")]
    assert len(compactions) == 2
    assert all(line.count("|") == 3 and " s)" in line for line in compactions), compactions


def test_a_layout_list_keeps_the_shipped_fold_and_names_an_unknown_label(
    postgres_server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = {"rows": 300, "users": 30, "active": 5, "repeats": 1, "held": False}
    bench_drain_layouts.main(
        postgres_server_url, **tiny, only=["append-only deltas, day partitions"]
    )
    header = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| | shipped")
    )
    assert header == "| | shipped | append-only deltas, day partitions |"
    with pytest.raises(SystemExit, match="--layout: no layout is called 'deltas'"):
        bench_drain_layouts.main(postgres_server_url, **tiny, only=["deltas"])
