"""Helpers of the web tests: the service on a loopback port, signed Resend events, and a plain
HTTP client that shows what a caller sees."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from sqlalchemy import Engine

from retention_pipeline.web.app import create_app
from retention_pipeline.web.journal import UnsubscribeJournal
from retention_pipeline.web.server import uvicorn_config
from retention_pipeline_tests.sending.support import LOOP

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"resend-signing-key-for-tests").decode()
OTHER_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"somebody-else's-signing-key").decode()


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    headers: dict[str, str]


@contextmanager
def serving(
    engine: Engine,
    *,
    schema: str,
    unsubscribe_secret: str,
    journal: Path,
    previous_unsubscribe_secrets: tuple[str, ...] = (),
    replay_seconds: float = 30.0,
    loop_names: tuple[str, ...] = (LOOP,),
) -> Iterator[str]:
    """`retention-pipeline serve`'s app under uvicorn on a free loopback port, its unsubscribe
    journal at `journal`; yields its URL."""
    app = create_app(
        engine,
        schema=schema,
        unsubscribe_secret=unsubscribe_secret,
        previous_unsubscribe_secrets=previous_unsubscribe_secrets,
        webhook_secret=WEBHOOK_SECRET,
        product_name="Acme",
        loop_names=loop_names,
        journal=UnsubscribeJournal(journal),
        replay_seconds=replay_seconds,
    )
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=0))
    thread = threading.Thread(target=server.run, name="serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def call(
    base_url: str,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request on a fresh connection, as a mail client or Resend would make it."""
    address = urlsplit(base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(
            response.status,
            response.read().decode(),
            {name.lower(): value for name, value in response.getheaders()},
        )
    finally:
        connection.close()


def resend_event(
    event_type: str, email_id: str, to: str, *, created_at: str = "2026-11-20T09:01:02.000Z", **data
) -> dict[str, Any]:
    """A Resend webhook payload of an email event, as Resend documents it."""
    return {
        "type": event_type,
        "created_at": created_at,
        "data": {
            "created_at": "2026-11-20T09:00:00.000Z",
            "email_id": email_id,
            "from": "Acme <hello@acme.test>",
            "to": [to],
            "subject": "We miss you",
            **data,
        },
    }


def signed(
    payload: dict[str, Any] | bytes,
    delivery_id: str,
    *,
    secret: str = WEBHOOK_SECRET,
    sent_at: float | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The body and Svix headers of one webhook delivery, signed as Svix signs them."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    timestamp = str(int(time.time() if sent_at is None else sent_at))
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signature = hmac.new(key, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return body, {
        "content-type": "application/json",
        "svix-id": delivery_id,
        "svix-timestamp": timestamp,
        "svix-signature": f"v1,{base64.b64encode(signature.digest()).decode()}",
    }
