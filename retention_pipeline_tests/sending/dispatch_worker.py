"""`send_pending` in a process of its own, for the crash test to kill.

    python -m retention_pipeline_tests.sending.dispatch_worker DATABASE_URL

Sends the pending batches of the test loop through the Resend SDK, at $RESEND_API_URL, and prints
the `DispatchReport` as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import resend
from sqlalchemy import create_engine

from retention_pipeline.email.resend_sender import ResendSender
from retention_pipeline.sending import send_pending
from retention_pipeline_tests.sending.support import API_KEY, FROM, LOOP, SCHEMA


def main(argv: list[str]) -> None:
    (url,) = argv
    resend.api_url = os.environ["RESEND_API_URL"]
    engine = create_engine(url)
    sender = ResendSender(API_KEY, FROM, requests_per_second=1000)
    report = send_pending(engine, schema=SCHEMA, loop_name=LOOP, sender=sender, provider="resend")
    print(json.dumps(dataclasses.asdict(report)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
