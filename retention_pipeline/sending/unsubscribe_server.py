"""A small HTTP endpoint for the unsubscribe links and RFC 8058 one-click unsubscribe.

`POST <path>?token=...` (what mail clients send, with the body `List-Unsubscribe=One-Click`)
suppresses the address and answers 200. `GET` only shows a page with a button that POSTs: link
scanners and previews follow GET links, and must not unsubscribe anyone. A bad token is a 400.

    server = make_server(engine, schema="retention", secret=..., host="127.0.0.1", port=8025)
    server.serve_forever()
"""

from __future__ import annotations

import logging
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from sqlalchemy import Engine

from retention_pipeline.email.unsubscribe import verify_token
from retention_pipeline.sending.suppressions import unsubscribe_with_token

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/email/unsubscribe"
_MAX_BODY_BYTES = 64 * 1024

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


def make_server(
    engine: Engine,
    *,
    schema: str,
    secret: str,
    host: str,
    port: int,
    path: str = DEFAULT_PATH,
) -> ThreadingHTTPServer:
    """A server answering unsubscribe requests at `path`; port 0 picks a free one (see
    `server.server_address`). The caller runs `serve_forever()` and `server_close()`."""
    return ThreadingHTTPServer((host, port), _handler(engine, schema, secret, path))


def _handler(engine: Engine, schema: str, secret: str, path: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # A client that stops sending must not hold a thread forever.
        timeout = 10

        def do_GET(self) -> None:
            token = self._token()
            if token is None:
                return
            try:
                verify_token(secret, token)
            except ValueError as exc:
                self._reply(HTTPStatus.BAD_REQUEST, str(exc))
                return
            action = escape(f"{path}?{urlencode({'token': token})}")
            self._reply(
                HTTPStatus.OK,
                _PAGE.format(
                    title="Unsubscribe",
                    body=(
                        "<p>Stop receiving these emails?</p>\n"
                        f'<form method="post" action="{action}">'
                        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
                        '<button type="submit">Unsubscribe</button></form>'
                    ),
                ),
                html=True,
            )

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self._reply(HTTPStatus.BAD_REQUEST, "bad Content-Length")
                return
            if length > _MAX_BODY_BYTES:
                self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
                return
            # The body only says "List-Unsubscribe=One-Click"; the token in the URL is what counts.
            self.rfile.read(length)
            token = self._token()
            if token is None:
                return
            try:
                with engine.begin() as connection:
                    unsubscribe_with_token(connection, schema=schema, secret=secret, token=token)
            except ValueError as exc:
                self._reply(HTTPStatus.BAD_REQUEST, str(exc))
                return
            except Exception:
                logger.exception("could not record an unsubscribe")
                self._reply(
                    HTTPStatus.INTERNAL_SERVER_ERROR, "could not unsubscribe right now; try again"
                )
                return
            self._reply(
                HTTPStatus.OK,
                _PAGE.format(
                    title="You are unsubscribed",
                    body="<p>You will not receive these emails any more.</p>",
                ),
                html=True,
            )

        def _token(self) -> str | None:
            url = urlsplit(self.path)
            if url.path != path:
                self._reply(HTTPStatus.NOT_FOUND, "not found")
                return None
            tokens = parse_qs(url.query).get("token")
            if not tokens or not tokens[0]:
                self._reply(HTTPStatus.BAD_REQUEST, "missing unsubscribe token")
                return None
            return tokens[0]

        def _reply(self, status: HTTPStatus, content: str, *, html: bool = False) -> None:
            body = content.encode() if html else f"{content}\n".encode()
            self.send_response(status)
            kind = "text/html" if html else "text/plain"
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            # The URL carries the token: keep it out of other sites' logs.
            self.send_header("Referrer-Policy", "no-referrer")
            self.end_headers()
            self.wfile.write(body)

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            # The request line carries the token, which unsubscribes whoever holds it: log the
            # path only.
            logger.info("%s %s -> %s", self.command, urlsplit(self.path).path, code)

        def log_message(self, format: str, *args: Any) -> None:
            logger.warning(format, *args)

    return Handler
