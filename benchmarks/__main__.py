"""python -m benchmarks run --users N [--shape wide|deep|both] [--repeats R] [--url URL]
[--output benchmarks/RESULTS.md]

python -m benchmarks morning --users N [--shape wide|deep|both] [--repeats R] [--url URL]
[--output benchmarks/RESULTS-morning.md]: the morning's critical path alone (`run` measures it too),
R times (3 by default), each on a copy of the database its history left (room for one more copy)

python -m benchmarks sources [--url URL] [--seconds S] [--rounds R] [--drain-rows N]
[--worst-rows N] [--worst-users N] [--active-users N] [--drain-repeats R] [--polling-seconds S]
[--output benchmarks/RESULTS-sources.md]: the activity sources' (polling included) and the drain's
figures alone (`run` measures them too, with its --capture-seconds and --repeats, unless
--skip-sources).

python -m benchmarks polling [--url URL] [--seconds S]: polling under an app's inserts, drains
SIGKILLed mid-poll, rows lost or doubled, as Markdown on stdout (`sources` measures it too).

python -m benchmarks drain [--url URL] [--rows N] [--users N] [--active N] [--repeats R]: the
drain's worst case and app-shaped drains alone, the shipped fold beside the one before, as a
Markdown table on stdout (`sources` measures them too).

python -m benchmarks drain-layouts [--url URL] [--rows N] [--users N] [--active N] [--repeats R]
[--held] [--layout LABEL ...]: storage layouts of the rollup the drain could write, each fold
beside the shipped one, what the rollup's readers pay and what a compaction costs, at statement
level, as Markdown tables on stdout.

python -m benchmarks audience --users N [N ...] [--url URL] [--repeats R]: the audience step of
three loops at each size, next to the snapshot step of as many users, on scratch databases of its
own, as a Markdown table on stdout.

python -m benchmarks local-time --users N [--audience-share S] [--repeats R] [--url URL]
[--bigint-ids] [--output benchmarks/RESULTS-local-time.md]: a day's emails by 24 hourly
local-time sends against the one daily send, side by side, and the plan of an hourly claim."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import (
    bench_audience,
    bench_drain,
    bench_drain_layouts,
    bench_local_time,
    bench_polling,
    bench_sources,
)
from benchmarks.bench_capture import Scratch
from benchmarks.run import SHAPES, Options, run, run_morning
from retention_pipeline.database.connection import normalize_url

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Growth seeds three more databases of up to 180 days; past this it would cost more than the
# rest of the run, and one day's growth with history shows at this size already.
GROWTH_USERS_CAP = 20_000


def _repeats(value: str) -> int:
    repeats = int(value)
    if repeats < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {repeats}")
    return repeats


def _worst_case_options(
    command: argparse.ArgumentParser, defaults: bench_sources.Options, *, repeats: int
) -> None:
    """The server and the worst case's size, which the drain's commands share."""
    command.add_argument("--url", default=DEFAULT_URL)
    command.add_argument("--rows", type=int, default=defaults.worst_rows)
    command.add_argument("--users", type=int, default=defaults.worst_users)
    command.add_argument("--active", type=int, default=defaults.active_users)
    command.add_argument("--repeats", type=int, default=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("run", help="every figure, written to a Markdown file")
    command.add_argument("--users", type=int, required=True)
    command.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    command.add_argument("--repeats", type=_repeats, default=3)
    command.add_argument(
        "--url", default=DEFAULT_URL, help="a database of the server (scratch ones are created)"
    )
    command.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS.md"))
    command.add_argument(
        "--growth-users",
        type=int,
        help=f"users of the growth-with-history databases (default: --users, at most "
        f"{GROWTH_USERS_CAP:,})",
    )
    command.add_argument("--capture-seconds", type=float, default=5)
    command.add_argument("--emails", type=int, default=1000)
    command.add_argument(
        "--skip-sources",
        action="store_true",
        help="leave out the activity sources' and the drain's figures (about 8 minutes)",
    )
    morning = commands.add_parser(
        "morning", help="the critical path alone: daily run's start to the first email"
    )
    morning.add_argument("--users", type=int, required=True)
    morning.add_argument("--shape", choices=[*SHAPES, "both"], default="wide")
    morning.add_argument("--url", default=DEFAULT_URL)
    morning.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS-morning.md"))
    morning.add_argument("--repeats", type=_repeats, default=3)
    sources = commands.add_parser(
        "sources", help="capture of a time updated in place, and the drain of several sources"
    )
    sources.add_argument("--url", default=DEFAULT_URL)
    sources.add_argument("--seconds", type=float, default=5)
    sources.add_argument("--rounds", type=int, default=3)
    defaults = bench_sources.Options()
    sources.add_argument("--drain-rows", type=int, default=defaults.drain_rows)
    sources.add_argument("--worst-rows", type=int, default=defaults.worst_rows)
    sources.add_argument("--worst-users", type=int, default=defaults.worst_users)
    sources.add_argument("--active-users", type=int, default=defaults.active_users)
    sources.add_argument("--drain-repeats", type=int, default=defaults.drain_repeats)
    sources.add_argument("--polling-seconds", type=float, default=defaults.polling_seconds)
    sources.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS-sources.md"))
    polling = commands.add_parser(
        "polling", help="polling under an app's inserts, drains killed mid-poll: lost, doubled"
    )
    polling.add_argument("--url", default=DEFAULT_URL)
    polling.add_argument("--seconds", type=float, default=defaults.polling_seconds)
    drain = commands.add_parser(
        "drain", help="the drain's worst case and app-shaped drains, each fold side by side"
    )
    _worst_case_options(drain, defaults, repeats=2)
    layouts = commands.add_parser(
        "drain-layouts", help="storage layouts of the rollup: each one's folds and readers"
    )
    _worst_case_options(layouts, defaults, repeats=3)
    layouts.add_argument(
        "--held", action="store_true", help="also the worst case into held days (minutes)"
    )
    layouts.add_argument(
        "--layout",
        action="append",
        default=[],
        help="measure this layout (by its label) beside the shipped one; repeat for several; "
        "default: every layout",
    )
    audience = commands.add_parser(
        "audience",
        help="the audience step of three loops against the snapshot step, one scratch database "
        "per size",
    )
    audience.add_argument("--users", type=int, nargs="+", required=True)
    audience.add_argument("--url", default=DEFAULT_URL)
    audience.add_argument("--repeats", type=int, default=3)
    local_time = commands.add_parser(
        "local-time", help="24 hourly local-time sends of a day against the one daily send"
    )
    local_time.add_argument("--users", type=int, required=True)
    local_time.add_argument(
        "--audience-share", type=float, default=0.02, help="treated members per user of a day"
    )
    local_time.add_argument("--repeats", type=int, default=2)
    local_time.add_argument("--url", default=DEFAULT_URL)
    local_time.add_argument(
        "--bigint-ids",
        action="store_true",
        help="the app's user ids as the demo's bigints instead of text",
    )
    local_time.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS-local-time.md"))
    args = parser.parse_args()
    if args.command == "local-time":
        result = bench_local_time.measure(
            normalize_url(args.url),
            args.users,
            args.audience_share,
            args.repeats,
            text_ids=not args.bigint_ids,
        )
        command = "python -m benchmarks " + " ".join(sys.argv[1:])
        bench_local_time.write(result, command, args.output)
        print(f"wrote {args.output}")
        return
    if args.command == "audience":
        results = [
            bench_audience.measure_scratch(normalize_url(args.url), users, args.repeats)
            for users in args.users
        ]
        print(bench_audience.render(results))
        return
    if args.command == "drain":
        bench_drain.main(normalize_url(args.url), args.rows, args.users, args.active, args.repeats)
        return
    if args.command == "drain-layouts":
        bench_drain_layouts.main(
            normalize_url(args.url),
            args.rows,
            args.users,
            args.active,
            args.repeats,
            args.held,
            args.layout,
        )
        return
    if args.command == "polling":
        scratch = Scratch(normalize_url(args.url))
        try:
            print("\n".join(bench_polling.render(bench_polling.measure(scratch, args.seconds))))
        finally:
            scratch.drop_all()
        return
    if args.command == "sources":
        options = bench_sources.Options(
            seconds=args.seconds,
            rounds=args.rounds,
            drain_rows=args.drain_rows,
            worst_rows=args.worst_rows,
            worst_users=args.worst_users,
            active_users=args.active_users,
            drain_repeats=args.drain_repeats,
            polling_seconds=args.polling_seconds,
        )
        results = bench_sources.measure_all(normalize_url(args.url), options)
        args.output.write_text(bench_sources.render(results, options))
        print(f"wrote {args.output}")
        return
    if args.command == "morning":
        run_morning(
            Options(
                users=args.users,
                shapes=list(SHAPES) if args.shape == "both" else [args.shape],
                repeats=args.repeats,
                server_url=normalize_url(args.url),
                output=args.output,
                growth_users=0,
                capture_seconds=0,
                emails=0,
            )
        )
        return
    run(
        Options(
            users=args.users,
            shapes=list(SHAPES) if args.shape == "both" else [args.shape],
            repeats=args.repeats,
            server_url=normalize_url(args.url),
            output=args.output,
            growth_users=args.growth_users or min(args.users, GROWTH_USERS_CAP),
            capture_seconds=args.capture_seconds,
            emails=args.emails,
            sources=not args.skip_sources,
        )
    )


if __name__ == "__main__":
    main()
