"""A local outbox: "sends" email by writing files a person can open, for demos and development.

Each email becomes `<stem>.html`, a page showing the envelope and the rendered email, and
`<stem>.eml`, the full MIME message (plain and HTML parts) that any mail client opens. The stem is
derived from the send-log key alone, so sending the same key again overwrites, never duplicates.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import format_datetime, parseaddr
from html import escape
from pathlib import Path

from retention_pipeline.email.message import OutgoingEmail, SendResult

_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")
# Headers up to the 998 characters RFC 5322 allows stay on one line: the default 78 would fold a
# long `List-Unsubscribe` URL into RFC 2047 encoded words, which no client reads as a URL.
_MIME_POLICY = default_policy.clone(max_line_length=998)

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  html, body {{ height: 100%; margin: 0; }}
  body {{ display: flex; flex-direction: column; background: #e5e7eb;
         font: 13px/1.4 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }}
  .envelope {{ background: #111827; color: #e5e7eb; padding: 10px 16px; }}
  .envelope table {{ border-collapse: collapse; }}
  .envelope th {{ color: #9ca3af; font-weight: 600; text-align: right; padding: 1px 10px 1px 0;
                 vertical-align: top; white-space: nowrap; }}
  .envelope td {{ padding: 1px 0; word-break: break-all; }}
  .envelope summary {{ cursor: pointer; color: #9ca3af; margin-top: 6px; }}
  .envelope pre {{ white-space: pre-wrap; background: #1f2937; padding: 8px; max-height: 40vh;
                  overflow: auto; }}
  iframe {{ flex: 1; width: 100%; border: 0; background: #fff; }}
</style>
</head>
<body>
<div class="envelope">
<table>
{rows}
</table>
<details><summary>Plain-text version</summary><pre>{text}</pre></details>
</div>
<iframe title="Email body" sandbox="allow-popups allow-popups-to-escape-sandbox"
        srcdoc="{body}"></iframe>
</body>
</html>
"""


class OutboxSender:
    """An `EmailSender` that writes each email into `directory` instead of sending it."""

    def __init__(
        self, directory: Path, from_address: str = "Retention Pipeline <outbox@localhost>"
    ) -> None:
        self.directory = Path(directory)
        self.from_address = from_address

    def send(
        self, emails: Sequence[OutgoingEmail], *, idempotency_key: str | None = None
    ) -> list[SendResult]:
        # Files are named after send keys, which makes re-sends harmless without a batch key.
        self.directory.mkdir(parents=True, exist_ok=True)
        results = []
        for email in emails:
            stem = _file_stem(email.key)
            try:
                mime = self._mime(email).as_bytes()
                _write_atomically(self.directory / f"{stem}.eml", mime)
                _write_atomically(self.directory / f"{stem}.html", self._page(email).encode())
            except (OSError, ValueError) as exc:
                # ValueError: the email package refuses header values with line breaks.
                results.append(SendResult(email.key, "failed", None, f"outbox: {exc}"))
                continue
            results.append(SendResult(email.key, "sent", f"outbox:{stem}.html", None))
        return results

    def _mime(self, email: OutgoingEmail) -> EmailMessage:
        message = EmailMessage(policy=_MIME_POLICY)
        message["From"] = self.from_address
        message["To"] = email.to
        message["Subject"] = email.subject
        message["Date"] = format_datetime(datetime.now(UTC))
        message["Message-ID"] = _message_id(email.key, self.from_address)
        message["X-Send-Key"] = email.key
        for name, value in email.headers.items():
            message[name] = value
        for name, value in email.tags.items():
            message["X-Tag"] = f"{name}={value}"
        message.set_content(email.text)
        message.add_alternative(email.html, subtype="html")
        return message

    def _page(self, email: OutgoingEmail) -> str:
        envelope = [
            ("From", self.from_address),
            ("To", email.to),
            ("Subject", email.subject),
            ("Send key", email.key),
            *email.headers.items(),
            *((f"Tag {name}", value) for name, value in email.tags.items()),
        ]
        rows = "\n".join(
            f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>" for name, value in envelope
        )
        return _PAGE.format(
            title=escape(email.subject),
            rows=rows,
            text=escape(email.text),
            body=escape(email.html, quote=True),
        )


def remove_from_outbox(directory: Path, keys: Sequence[str]) -> int:
    """Delete the files of these send keys (their user was erased); returns how many."""
    removed = 0
    for key in keys:
        for suffix in (".eml", ".html"):
            path = Path(directory) / f"{_file_stem(key)}{suffix}"
            if path.exists():
                path.unlink()
                removed += 1
    return removed


def _message_id(key: str, from_address: str) -> str:
    # One id per send key, like the file name: writing the email again keeps its identity.
    domain = parseaddr(from_address)[1].rpartition("@")[2] or "localhost"
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@{domain}>"


def _file_stem(key: str) -> str:
    # The readable part may collide ("a:b" and "a/b") or differ only in case, which some file
    # systems ignore; the digest of the exact key keeps one file per key.
    readable = _UNSAFE_FILENAME.sub("_", key).strip("._")[:100] or "email"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


def _write_atomically(path: Path, content: bytes) -> None:
    # A crash mid-write must not leave a truncated file that looks like a sent email.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
