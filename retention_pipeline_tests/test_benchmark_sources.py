"""`python -m benchmarks sources` at a tiny size: the UPDATE capture loads, polling under inserts
with drains killed, and every drain case run on real scratch databases, and the report and
targets hold every figure; never how fast anything was."""

from __future__ import annotations

import re

from benchmarks import bench_polling, bench_sources


def test_the_sources_benchmark_reports_every_figure(postgres_server_url: str) -> None:
    options = bench_sources.Options(
        seconds=0.3,
        rounds=1,
        drain_rows=3000,
        worst_rows=6000,
        worst_users=600,
        active_users=50,
        polling_seconds=8,
    )
    results = bench_sources.measure_all(postgres_server_url, options)
    report = bench_sources.render(results, options)

    assert report.startswith("## Activity sources\n")
    assert "\n## Polling\n" in report and "\n## Drain\n" in report
    assert [figure.lost_or_doubled for figure in results["updates"]] == [0, 0]
    polling = results["polling"]
    assert polling.rows > 0 and polling.killed_mid_poll >= 1
    assert (polling.lost, polling.doubled) == (0, 0)
    rows = bench_sources.targets(results)
    assert [row[0] for row in rows] == [*["sources"] * 4, *["drain"] * (len(rows) - 4)]
    assert len(results["snapshots"]) == 2 and all(results["snapshots"])
    assert len(rows) >= 5
    assert bench_polling.target_row(polling) in rows
    for row in rows:
        if row == bench_polling.target_row(polling):
            continue  # lost and doubled: 0 is the figure wanted
        assert float(re.match(r"[0-9.,]+", row[2])[0].replace(",", "")) > 0, row
        assert row[4] in ("met", "**not met**"), row
