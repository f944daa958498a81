"""Emails per second through `ResendSender.send`, unthrottled and at Resend's rate limit, side by
side in one run, against the local fake Resend API (a real HTTP server on a thread).

    python benchmarks/bench_sending.py --emails 5000

Each email is a rendered `re_engagement` email (inlined CSS, about the size a real one is), so the
requests carry realistic bodies. Unthrottled shows what the client and the HTTP round trips cost;
throttled, at the default 2 requests per second of 100 emails, is what a Resend account allows.
"""

from __future__ import annotations

import argparse
import bisect
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from retention_pipeline.email.message import OutgoingEmail
from retention_pipeline.email.render import render_email
from retention_pipeline.email.resend_sender import BATCH_SIZE, ResendSender
from retention_pipeline_tests.email.fake_resend import serve_fake_resend

API_KEY = "re_bench_key"


def make_emails(count: int) -> list[OutgoingEmail]:
    rendered = render_email(
        "re_engagement",
        {
            "user": {"name": "Ada Lovelace", "email": "ada@example.com"},
            "variant": "a",
            "product_name": "Acme",
            "app_url": "https://app.acme.test",
            "company_address": "Acme Inc., 1 Example Street, Springfield",
            "unsubscribe_url": "https://app.acme.test/email/unsubscribe?token=x",
            "days_inactive": 9,
            "last_actions": ["exported a report", "created a project"],
        },
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S%f")
    return [
        OutgoingEmail(
            key=f"bench:{stamp}:{n}",
            to=f"user{n}@example.com",
            subject=rendered.subject,
            html=rendered.html,
            text=rendered.text,
            headers={
                "List-Unsubscribe": f"<https://app.acme.test/email/unsubscribe?token={n}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
            tags={"loop": "re_engagement", "step": "0", "variant": "a"},
        )
        for n in range(count)
    ]


@dataclass(frozen=True)
class Sending:
    seconds: float
    requests: int
    accepted: int
    peak_requests_per_second: int
    """The most requests the server received within any one second."""


def peak_per_second(arrivals: list[float]) -> int:
    arrivals = sorted(arrivals)
    return max(
        (bisect.bisect_left(arrivals, start + 1.0) - index for index, start in enumerate(arrivals)),
        default=0,
    )


def measure(emails: list[OutgoingEmail], requests_per_second: float) -> Sending:
    """Send `emails` to a fresh fake server at `requests_per_second`."""
    # A fresh server each time: its idempotency store would otherwise answer repeats from memory.
    with serve_fake_resend() as fake:
        sender = ResendSender(API_KEY, "Acme <hello@acme.test>", requests_per_second)
        started = time.perf_counter()
        results = sender.send(emails)
        elapsed = time.perf_counter() - started
        if any(result.status != "sent" for result in results):
            raise SystemExit("the fake server rejected emails; the measurement is void")
        return Sending(
            elapsed,
            len(fake.requests),
            fake.delivered_count,
            peak_per_second([request.arrived_at for request in fake.requests]),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emails", type=int, default=5000)
    parser.add_argument(
        "--throttled-rps", type=float, default=2.0, help="Resend's default rate limit"
    )
    args = parser.parse_args()

    emails = make_emails(args.emails)
    size = len(emails[0].html) + len(emails[0].text)
    print(f"{args.emails} emails of {size / 1024:.1f} KiB (html + text), {BATCH_SIZE} per request")
    rows = [
        ("unthrottled", 1e9),
        (f"throttled ({args.throttled_rps:g} req/s)", args.throttled_rps),
    ]
    print(
        f"{'mode':<24} {'requests':>8} {'accepted':>8} {'seconds':>8} {'emails/s':>9} "
        f"{'peak req/s':>10}"
    )
    for label, rate in rows:
        sent = measure(emails, rate)
        print(
            f"{label:<24} {sent.requests:>8} {sent.accepted:>8} {sent.seconds:>8.2f} "
            f"{sent.accepted / sent.seconds:>9.0f} {sent.peak_requests_per_second:>10}"
        )


if __name__ == "__main__":
    main()
