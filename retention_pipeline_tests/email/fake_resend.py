"""A local stand-in for the Resend API: a real HTTP server speaking `POST /emails/batch`.

It answers what the `resend` SDK (2.52) expects: JSON bodies with `application/json`, errors as
`{"statusCode", "name", "message"}`, success as `{"data": [{"id"}], "errors": [{"index",
"message"}]}` when the request carries `x-batch-validation: permissive`. It records every request,
replays the stored response for a repeated `Idempotency-Key` (409 `invalid_idempotent_request` when
the payload differs, as Resend does; only accepted requests are stored), and can be scripted to
answer the next requests with 429 or 5xx, or to accept them and drop the answer.

Use `serve_fake_resend()` (or the `fake_resend` fixture in this package's conftest) so the SDK is
pointed at the server and restored afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import resend

BATCH_PATH = "/emails/batch"


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received, and how it answered."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names in lower case."""
    body: Any
    status: int
    replayed: bool
    arrived_at: float
    """When its headers had arrived, on `time.monotonic()`: what a rate limit counts."""

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")

    @property
    def emails(self) -> list[dict[str, Any]]:
        return self.body if isinstance(self.body, list) else []


@dataclass(frozen=True)
class _Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Scripted:
    status: int
    name: str
    message: str
    headers: dict[str, str]
    echo_authorization: bool


class FakeResend:
    """The server and its state. Thread-safe: the server handles requests on its own threads.

    `invalid_marker`: recipient addresses containing it are rejected as invalid (per item when
    permissive, the whole batch with 422 otherwise). `api_key`: when set, other keys get 403.
    """

    def __init__(self, invalid_marker: str = "invalid", api_key: str | None = None) -> None:
        self.invalid_marker = invalid_marker
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.delivered: list[dict[str, Any]] = []
        self._scripted: deque[_Scripted] = deque()
        self._answers_to_drop = 0
        self._ids_to_leave_out = 0
        self._stored: dict[str, tuple[str, _Answer]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-resend", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def delivered_count(self) -> int:
        with self._lock:
            return len(self.delivered)

    def start(self) -> FakeResend:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def rate_limit_next(self, count: int = 1, retry_after: float = 1) -> None:
        """Answer the next `count` requests with 429 and a `retry-after` header (seconds)."""
        self._script(
            count,
            _Scripted(
                429,
                "rate_limit_exceeded",
                "Too many requests. You can only make 2 requests per second.",
                {"retry-after": f"{retry_after:g}"},
                False,
            ),
        )

    def fail_next(
        self,
        count: int = 1,
        status: int = 500,
        name: str = "application_error",
        message: str = "An unexpected error occurred.",
        echo_authorization: bool = False,
    ) -> None:
        """Answer the next `count` requests with an error; `echo_authorization` puts the request's
        Authorization header into the message, as a careless proxy might."""
        self._script(count, _Scripted(status, name, message, {}, echo_authorization))

    def drop_answer_next(self, count: int = 1) -> None:
        """Handle the next `count` requests as usual (deliver, remember the key), then close the
        connection without answering: the emails went out, the client cannot know."""
        with self._lock:
            self._answers_to_drop += count

    def leave_out_an_id_next(self, count: int = 1) -> None:
        """Deliver the next `count` requests' emails, answering each without its first email's
        id: an answer that does not add up."""
        with self._lock:
            self._ids_to_leave_out += count

    def delivered_to(self) -> list[str]:
        with self._lock:
            return [address for email in self.delivered for address in email["to"]]

    def _script(self, count: int, scripted: _Scripted) -> None:
        with self._lock:
            self._scripted.extend([scripted] * count)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        arrived_at = time.monotonic()
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self._lock:
            answer, replayed = self._answer(handler.command, handler.path, headers, body)
            drop_answer = self._answers_to_drop > 0
            self._answers_to_drop -= drop_answer
            self.requests.append(
                RecordedRequest(
                    handler.command,
                    handler.path,
                    headers,
                    body,
                    answer.status,
                    replayed,
                    arrived_at,
                )
            )
        if drop_answer:
            handler.close_connection = True
            return
        content = json.dumps(answer.body).encode()
        handler.send_response(answer.status)
        handler.send_header("Content-Type", "application/json; charset=utf-8")
        handler.send_header("Content-Length", str(len(content)))
        for name, value in answer.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(content)

    def _answer(
        self, method: str, path: str, headers: dict[str, str], body: Any
    ) -> tuple[_Answer, bool]:
        if method != "POST" or path != BATCH_PATH:
            return _error(404, "not_found", f"{method} {path} is not served by the fake"), False
        authorization = headers.get("authorization", "")
        token = authorization.removeprefix("Bearer ").strip()
        if not authorization.startswith("Bearer ") or not token or token == "None":
            return _error(
                401, "missing_api_key", "Missing API key in the authorization header"
            ), False
        if self._scripted:
            scripted = self._scripted.popleft()
            message = scripted.message
            if scripted.echo_authorization:
                message += f" (request had Authorization: {authorization})"
            return _error(scripted.status, scripted.name, message, scripted.headers), False
        if self.api_key is not None and token != self.api_key:
            return _error(403, "invalid_api_key", "API key is invalid"), False
        if not isinstance(body, list) or not 1 <= len(body) <= 100:
            return _error(422, "validation_error", "The body must be 1 to 100 emails."), False

        key = headers.get("idempotency-key")
        fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if key is not None and key in self._stored:
            stored_fingerprint, stored = self._stored[key]
            if stored_fingerprint == fingerprint:
                return stored, True
            return _error(
                409,
                "invalid_idempotent_request",
                "Same idempotency key used with a different request payload.",
            ), False

        errors = [
            {"index": index, "message": problem}
            for index, email in enumerate(body)
            if (problem := self._problem(email)) is not None
        ]
        permissive = headers.get("x-batch-validation") == "permissive"
        if errors and not permissive:
            return _error(422, "validation_error", errors[0]["message"]), False
        rejected = {error["index"] for error in errors}
        data = []
        for index, email in enumerate(body):
            if index in rejected:
                continue
            email_id = str(uuid.uuid4())
            self.delivered.append({**email, "id": email_id, "idempotency_key": key})
            data.append({"id": email_id})
        if self._ids_to_leave_out > 0:
            self._ids_to_leave_out -= 1
            data = data[1:]
        answer = _Answer(200, {"data": data, "errors": errors} if permissive else {"data": data})
        if key is not None:
            self._stored[key] = (fingerprint, answer)
        return answer, False

    def _problem(self, email: Any) -> str | None:
        if not isinstance(email, dict):
            return "Each email must be an object."
        for required in ("from", "to", "subject"):
            if not email.get(required):
                return f"Missing `{required}` field."
        recipients = email["to"] if isinstance(email["to"], list) else [email["to"]]
        for address in recipients:
            if "@" not in str(address) or self.invalid_marker in str(address):
                return (
                    "Invalid `to` field. The email address needs to follow the "
                    "`email@example.com` or `Name <email@example.com>` format."
                )
        return None


def _error(status: int, name: str, message: str, headers: dict[str, str] | None = None) -> _Answer:
    return _Answer(status, {"statusCode": status, "name": name, "message": message}, headers or {})


def _handler_for(fake: FakeResend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            fake._handle(self)

        do_GET = do_POST

        def log_message(self, format: str, *args: Any) -> None:
            """Keep test output quiet."""

    return Handler


@contextmanager
def serve_fake_resend(
    invalid_marker: str = "invalid", api_key: str | None = None
) -> Iterator[FakeResend]:
    """Run a `FakeResend` and point the `resend` SDK at it (`resend.api_url` and
    `RESEND_API_URL`), restoring both afterwards."""
    fake = FakeResend(invalid_marker=invalid_marker, api_key=api_key).start()
    previous_url = resend.api_url
    previous_env = os.environ.get("RESEND_API_URL")
    resend.api_url = fake.url
    os.environ["RESEND_API_URL"] = fake.url
    try:
        yield fake
    finally:
        resend.api_url = previous_url
        if previous_env is None:
            os.environ.pop("RESEND_API_URL", None)
        else:
            os.environ["RESEND_API_URL"] = previous_env
        fake.close()


class FakeClock:
    """A monotonic clock that only moves when something sleeps on it; records every sleep.

    Pass `clock=fake_clock` and `sleep=fake_clock.sleep` to `ResendSender`.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
