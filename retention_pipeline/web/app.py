"""The ASGI app of `retention-pipeline serve`.

- `POST /webhooks/resend`: Resend's delivery events, verified (Svix signature, at most 5 minutes
  old) by the resend SDK, stored once per `svix-id` (see `recipients.delivery`); 503 while the
  database cannot store it, so that Resend delivers it again.
- `GET /unsubscribe?token=...`: a page with buttons that POST; link scanners and previews follow
  GET links and must not unsubscribe anyone.
- `POST /unsubscribe?token=...`: RFC 8058 one-click unsubscribe: 200, and the address is
  suppressed; repeating it is harmless. While the database cannot take it, the unsubscribe goes
  to a journal on local disk (`web.journal`) that a background task replays every
  `replay_seconds`, from start-up on, until the database takes it.
- `GET /healthz`: 200 when the database answers and holds the pipeline's current schema.

Requests over `MAX_URL_BYTES` of URL or `MAX_BODY_BYTES` of body get a 4xx before any work;
errors are one line, never a stack trace; each request is one JSON access-log line without its
query string (which carries the unsubscribe token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from html import escape
from urllib.parse import urlencode

import resend
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retention_pipeline.database.migrate import installation_problem
from retention_pipeline.email.unsubscribe import make_token, verify_token
from retention_pipeline.recipients.delivery import InvalidEventError, parse_event, store_event
from retention_pipeline.recipients.suppressions import NothingToUnsubscribe, unsubscribe_user
from retention_pipeline.web.journal import UnsubscribeJournal, database_failure

MAX_URL_BYTES = 8 * 1024
MAX_BODY_BYTES = 256 * 1024
"""Resend's events and one-click bodies are a few kB; the limits keep anything else out."""
DISCARD_BYTES = 32 * 1024 * 1024
"""How much of an oversized body is read and dropped before the 413: a client that is still
sending when the answer comes would otherwise lose it to a reset connection. Beyond this the
connection is simply closed."""

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("retention_pipeline.web.access")

# The URL carries the token, which unsubscribes whoever holds it: keep it out of other sites'
# logs and of caches.
_SAFETY_HEADERS = (
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
)

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 4em auto; padding: 0 1em;">
<h1 style="font-size: 1.4em;">{title}</h1>
{body}
</body>
</html>
"""


def create_app(
    engine: Engine,
    *,
    schema: str,
    unsubscribe_secret: str,
    webhook_secret: str,
    product_name: str,
    loop_names: Sequence[str],
    journal: UnsubscribeJournal,
    previous_unsubscribe_secrets: Sequence[str] = (),
    replay_seconds: float = 30.0,
) -> ASGIApp:
    """The web service over the pipeline's schema in `engine`'s database; unsubscribes the
    database cannot take wait in `journal`. Links signed with `previous_unsubscribe_secrets`
    (rotated out) still unsubscribe. A link of a loop not among `loop_names` (the configured
    loops: it was renamed or removed since the email) unsubscribes from every loop: scoped to
    a name no loop has, it would hold back nobody."""

    async def resend_webhook(request: Request) -> Response:
        body = await _body(request)
        headers = {part: request.headers.get(f"svix-{part}", "") for part in _SVIX_PARTS}
        missing = [f"svix-{part}" for part, value in headers.items() if not value]
        if missing:
            return _text(400, f"missing header {', '.join(missing)}")
        try:
            payload = resend.Webhooks.verify(
                {
                    "payload": body.decode("utf-8"),
                    "headers": headers,
                    "webhook_secret": webhook_secret,
                }
            )
        except (ValueError, UnicodeDecodeError) as rejected:
            return _text(401, f"webhook rejected: {_one_line(rejected)}")
        try:
            event = parse_event(headers["id"], payload)
        except InvalidEventError as invalid:
            return _text(400, str(invalid))
        if event is None:
            return JSONResponse({"status": "ignored"})

        def store():
            with engine.begin() as connection:
                return store_event(connection, schema=schema, event=event)

        try:
            stored = await run_in_threadpool(store)
        except SQLAlchemyError as error:
            logger.warning(
                "resend event %s %s not stored: %s; answered 503 for Resend to deliver it again",
                event.event_type,
                event.delivery_id,
                database_failure(error),
            )
            return _text(503, "the database is unavailable; deliver the event again later")
        logger.info(
            "resend event %s %s: %s%s",
            event.event_type,
            event.delivery_id,
            stored.outcome,
            f", {len(stored.suppressed)} address(es) suppressed" if stored.suppressed else "",
        )
        return JSONResponse({"status": stored.outcome})

    async def unsubscribe(request: Request) -> Response:
        await _body(request)  # RFC 8058's `List-Unsubscribe=One-Click`: the token is what counts
        token = request.query_params.get("token", "")
        if not token:
            return _page(400, "Unsubscribe link incomplete", "The link has no token.")
        try:
            user_id, loop = verify_token(
                unsubscribe_secret, token, previous=previous_unsubscribe_secrets
            )
        except ValueError as invalid:
            return _page(400, "Unsubscribe link not valid", f"{invalid}.")
        if loop is not None and loop not in loop_names:
            loop = None
            token = make_token(unsubscribe_secret, user_id, None)
        # Only a POST unsubscribes: a HEAD, which Starlette answers for every GET route, is
        # what link checkers send as often as a GET.
        if request.method != "POST":
            return _confirmation(token, loop, make_token(unsubscribe_secret, user_id, None))

        def record():
            with engine.begin() as connection:
                unsubscribe_user(connection, schema=schema, user_id=str(user_id), loop_name=loop)

        try:
            await run_in_threadpool(record)
        except NothingToUnsubscribe as nothing:
            return _page(404, "Nothing to unsubscribe", f"{nothing}.")
        except SQLAlchemyError as error:
            # Kept on disk before the reader hears it is done; a failing disk is a 500.
            await run_in_threadpool(journal.record, str(user_id), loop)
            logger.warning(
                "unsubscribe of user %s from %s journaled in %s: %s; the journal is replayed "
                "when the database answers",
                user_id,
                f"loop {loop}" if loop else "every loop",
                journal.path,
                database_failure(error),
            )
        scope = "these emails" if loop else f"any email from {product_name}"
        return _page(200, "You are unsubscribed", f"You will not receive {scope} any more.")

    def _confirmation(token: str, loop: str | None, every_loop_token: str) -> Response:
        forms = [] if loop is None else [(token, "Unsubscribe from these emails")]
        forms.append((every_loop_token, f"Unsubscribe from all {product_name} emails"))
        buttons = "\n".join(
            f'<form method="post" action="?{escape(urlencode({"token": value}))}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            f'<button type="submit">{escape(label)}</button></form>'
            for value, label in forms
        )
        return _page(200, "Unsubscribe", "Stop receiving these emails?", buttons)

    async def healthz(_request: Request) -> Response:
        def check() -> str | None:
            with engine.connect() as connection:
                return installation_problem(connection, schema)

        try:
            problem = await run_in_threadpool(check)
        except SQLAlchemyError as error:
            logger.warning("health check: the database is unreachable (%s)", type(error).__name__)
            return _text(503, "the database is unreachable")
        if problem:
            return _text(503, problem)
        return _text(200, "ok")

    def replay_journal() -> None:
        if not journal.pending():
            return
        replay = journal.replay(engine, schema)
        if replay.suppressed or replay.nothing_to_unsubscribe:
            logger.info(
                "unsubscribe journal replayed: %d written to the database, %d of users never "
                "emailed dropped, %d left",
                replay.suppressed,
                replay.nothing_to_unsubscribe,
                replay.left,
            )
        if replay.failure:
            logger.warning(
                "%d journaled unsubscribe(s) in %s wait for the database: %s; next try in %gs",
                replay.left,
                journal.path,
                replay.failure,
                replay_seconds,
            )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async def keep_replaying() -> None:
            while True:
                try:
                    await run_in_threadpool(replay_journal)
                except Exception:
                    logger.exception("replaying the unsubscribe journal %s failed", journal.path)
                await asyncio.sleep(replay_seconds)

        replaying = asyncio.create_task(keep_replaying())
        try:
            yield
        finally:
            replaying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replaying

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/webhooks/resend", resend_webhook, methods=["POST"]),
            Route("/unsubscribe", unsubscribe, methods=["GET", "POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    return _Guard(app)


_SVIX_PARTS = ("id", "timestamp", "signature")


class _Guard:
    """Limits, one-line errors and the access log, around every request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None
        logged = False

        def log_access() -> None:
            nonlocal logged
            logged = True
            access_logger.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        "path": scope["path"][:200],
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                        "client": (scope.get("client") or ("-",))[0],
                    }
                },
            )

        async def respond(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *_SAFETY_HEADERS]
            elif not message.get("more_body", False):
                log_access()  # before the last bytes: whoever got the answer finds the line
            await send(message)

        try:
            refusal = _refusal(scope)
            if refusal:
                if refusal[0] == 413:
                    await _discard_body(receive)
                await _text(*refusal)(scope, receive, respond)
            else:
                await self.app(scope, receive, respond)
        except Exception:
            logger.exception("%s %s failed", scope["method"], scope["path"][:200])
            if status is None:
                await _text(500, "internal error; try again later")(scope, receive, respond)
        finally:
            if not logged:  # the client went away, or the answer never completed
                log_access()


def _refusal(scope: Scope) -> tuple[int, str] | None:
    if len(scope.get("raw_path") or b"") + len(scope["query_string"]) > MAX_URL_BYTES:
        return 414, f"the URL is longer than {MAX_URL_BYTES // 1024} KiB"
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None:
        if not declared.isdigit():
            return 400, "Content-Length is not a number"
        if int(declared) > MAX_BODY_BYTES:
            return 413, f"the request body is larger than {MAX_BODY_BYTES // 1024} KiB"
    return None


async def _body(request: Request) -> bytes:
    """The request body, read no further than `MAX_BODY_BYTES` (a chunked body declares no
    length up front)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            await _discard_body(request.receive, size)
            raise HTTPException(
                413, f"the request body is larger than {MAX_BODY_BYTES // 1024} KiB"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _discard_body(receive: Receive, already_read: int = 0) -> None:
    size = already_read
    while size <= DISCARD_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _http_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    return _text(error.status_code, error.detail)


def _text(status: int, message: str) -> Response:
    return PlainTextResponse(f"{message}\n", status_code=status)


def _page(status: int, title: str, message: str, forms_html: str = "") -> Response:
    body = f"<p>{escape(message)}</p>\n{forms_html}"
    return HTMLResponse(_PAGE.format(title=escape(title), body=body), status_code=status)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
