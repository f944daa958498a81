"""Send `OutgoingEmail`s through Resend's batch endpoint: paced, retried and idempotent.

Delivery failures never raise: every email gets a `SendResult`, and the caller records the failed
ones. The API key never leaves this module in an error, a log line or a result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import resend
from resend.exceptions import NoContentError, ResendError

from retention_pipeline.email.message import OutgoingEmail, SendResult

logger = logging.getLogger(__name__)

BATCH_SIZE = 100
"""Resend accepts at most 100 emails per batch request."""

# The SDK reads the API key from a module global when it builds each request, so two senders with
# different keys in one process must not interleave between setting the key and sending.
_SDK_LOCK = threading.Lock()

_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_BEARER = re.compile(r"Bearer\s+\S+", re.IGNORECASE)
_QUOTA_ERRORS = frozenset({"daily_quota_exceeded", "monthly_quota_exceeded"})
_AUTH_STATUSES = frozenset({401, 403})


def batch_idempotency_key(keys: Iterable[str]) -> str:
    """The `Idempotency-Key` of a batch sent without one of its own: a digest of its sorted
    send-log keys.

    Sorting makes it independent of order inside the batch; JSON keeps `["a,b"]` and `["a", "b"]`
    apart. Resend remembers the key for 24 hours, so re-sending the same batch in that window
    returns the first response instead of sending again.
    """
    digest = hashlib.sha256(json.dumps(sorted(keys)).encode()).hexdigest()
    return f"retention-batch/{digest}"


@dataclass(frozen=True)
class _Failure:
    description: str
    retryable: bool
    retry_after: float | None = None
    stops_run: bool = False
    already_sent: bool = False
    maybe_delivered: bool = False


class Pacer(Protocol):
    """Decides when the next request may start: `wait` returns when it may."""

    def wait(self) -> None: ...


JITTER_MARGIN_SECONDS = 0.025
"""Added to every interval between request starts. The time from a request's start to its arrival
at the provider varies (serializing a batch, connecting, the network, the scheduler of a busy
machine: about 10 ms here), so requests spaced exactly would sometimes arrive closer together
than the limit."""


class _Pacer:
    """Spaces this sender's request starts at least `1 / requests_per_second` (and
    `JITTER_MARGIN_SECONDS`) apart, counted from when each really started: a late wake-up must
    not bring the next start closer."""

    def __init__(
        self, requests_per_second: float, clock: Callable[[], float], sleep: Callable[[float], None]
    ) -> None:
        self._interval = 1.0 / requests_per_second + JITTER_MARGIN_SECONDS
        self._clock = clock
        self._sleep = sleep
        self._next_start: float | None = None

    def wait(self) -> None:
        now = self._clock()
        if self._next_start is not None and now < self._next_start:
            self._sleep(self._next_start - now)
            now = self._clock()
        self._next_start = now + self._interval


class ResendSender:
    """An `EmailSender` backed by the official `resend` SDK (`resend.Batch.send`).

    Emails are split into batches of at most 100 in input order; each batch is sent sorted by key,
    with the caller's `idempotency_key` (a stored batch's, so at most 100 emails) or one derived
    from its keys, and permissive validation (an invalid email fails alone). Results come back in
    input order. Requests are paced to `requests_per_second`; 429 waits `retry-after`, 5xx and
    connection errors back off exponentially with full jitter, up to `max_attempts` requests per
    batch; a batch given up on that way fails with `retryable=True`.

    `409 invalid_idempotent_request` (the key came before with a different payload: the same
    batch before members were withheld from it) means Resend accepted an earlier request with
    the key, which held every email of this one: they count as sent, without Resend's ids. Other
    4xx answers fail the batch for good, without a retry, and 401/403 fail the rest of the call
    too.

    `sleep`, `clock` and `rng` (the jitter's source) are injectable so tests can observe waiting
    without waiting. Retries, waits and failures go to `log` (a Dagster run passes its own, so
    they show in the run's event log). A `pacer` shared with other senders (several send runs on
    one Resend account) replaces the sender's own pacing at `requests_per_second`.
    """

    def __init__(
        self,
        api_key: str,
        from_address: str,
        requests_per_second: float = 2.0,
        max_attempts: int = 6,
        backoff_base_seconds: float = 0.5,
        backoff_max_seconds: float = 30,
        reply_to: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        log: logging.Logger = logger,
        pacer: Pacer | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("ResendSender needs an API key; use OutboxSender when there is none")
        if not from_address:
            raise ValueError("ResendSender needs a from_address")
        if requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be positive, got {requests_per_second}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if backoff_base_seconds < 0 or backoff_max_seconds < 0:
            raise ValueError("backoff_base_seconds and backoff_max_seconds must not be negative")
        self._api_key = api_key
        self.from_address = from_address
        self.reply_to = reply_to
        self.max_attempts = max_attempts
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self._sleep = sleep
        self._pacer = pacer or _Pacer(requests_per_second, clock, sleep)
        self._random = rng or random.Random()
        self._log = log

    def __repr__(self) -> str:
        return f"ResendSender(from_address={self.from_address!r}, api_key=[redacted])"

    def send(
        self, emails: Sequence[OutgoingEmail], *, idempotency_key: str | None = None
    ) -> list[SendResult]:
        duplicates = sorted(key for key, n in Counter(e.key for e in emails).items() if n > 1)
        if duplicates:
            # One key twice would share an Idempotency-Key yet be two deliveries: a caller bug.
            raise ValueError(f"duplicate send keys in one send: {duplicates[:5]}")
        if idempotency_key is not None and len(emails) > BATCH_SIZE:
            # Two requests with one key: Resend would answer the second with the first's reply.
            raise ValueError(
                f"{len(emails)} emails under one idempotency key; one request takes {BATCH_SIZE}"
            )
        batches = [
            emails[start : start + BATCH_SIZE] for start in range(0, len(emails), BATCH_SIZE)
        ]
        results: list[SendResult] = []
        stop_reason: str | None = None
        for number, batch in enumerate(batches, start=1):
            if stop_reason is not None:
                # An invalid key or a spent quota fails every request alike; don't hammer the
                # API. Nothing was sent, so these stay retryable for when it is fixed.
                results.extend(_failed(batch, stop_reason, retryable=True, undelivered=True))
                continue
            batch_results, stop_reason = self._send_batch(
                batch, number, len(batches), idempotency_key
            )
            results.extend(batch_results)
        return results

    def _send_batch(
        self,
        batch: Sequence[OutgoingEmail],
        number: int,
        total: int,
        idempotency_key: str | None,
    ) -> tuple[list[SendResult], str | None]:
        # Resend answers 409 when a known Idempotency-Key comes with a different payload, so the
        # payload, like the key, must depend only on which emails are in the batch, not their order.
        ordered = sorted(batch, key=lambda email: email.key)
        params = [self._params(email) for email in ordered]
        if idempotency_key is None:
            idempotency_key = batch_idempotency_key(email.key for email in ordered)
        options: resend.Batch.SendOptions = {
            "idempotency_key": idempotency_key,
            "batch_validation": "permissive",
        }
        label = f"Resend batch {number}/{total} ({len(batch)} emails)"
        attempt = 0
        # Whether a request so far may have delivered the batch: one that timed out, lost its
        # connection or met a server error may have; one refused with a 4xx status did not.
        maybe_delivered = False
        while True:
            attempt += 1
            try:
                response = self._post(params, options)
            except (ResendError, NoContentError) as exc:
                failure = self._classify(exc)
                maybe_delivered = maybe_delivered or failure.maybe_delivered
            else:
                by_key = {result.key: result for result in self._results(ordered, response, label)}
                return [by_key[email.key] for email in batch], None
            if failure.already_sent:
                self._log.warning(
                    "%s: Resend accepted an earlier request with this Idempotency-Key, which held "
                    "every email of this one: recorded as sent (%s)",
                    label,
                    failure.description,
                )
                note = (
                    "sent by an earlier request with this batch's Idempotency-Key, so Resend's id "
                    f"is unknown ({failure.description})"
                )
                return [SendResult(email.key, "sent", None, note) for email in batch], None
            if not failure.retryable:
                self._log.error("%s failed: %s", label, failure.description)
                error = f"rejected by Resend: {failure.description}"
                if failure.stops_run:
                    return _failed(
                        batch, error, retryable=True, undelivered=not maybe_delivered
                    ), error
                return _failed(batch, error), None
            if attempt == self.max_attempts:
                self._log.error(
                    "%s: giving up after %d attempts: %s", label, attempt, failure.description
                )
                error = (
                    f"gave up after {attempt} attempts, last error: {failure.description} "
                    "(re-sending this batch within 24 hours reuses its Idempotency-Key, so emails "
                    "Resend did accept are not sent twice)"
                )
                return _failed(batch, error, retryable=True), None
            delay = (
                failure.retry_after if failure.retry_after is not None else self._backoff(attempt)
            )
            self._log.warning(
                "%s: %s; retrying in %.2fs (attempt %d of %d)",
                label,
                failure.description,
                delay,
                attempt + 1,
                self.max_attempts,
            )
            self._sleep(delay)

    def _post(
        self, params: list[resend.Emails.SendParams], options: resend.Batch.SendOptions
    ) -> resend.Batch.SendResponse:
        with _SDK_LOCK:
            self._pacer.wait()
            previous_key = resend.api_key
            resend.api_key = self._api_key
            try:
                return resend.Batch.send(params, options)
            finally:
                resend.api_key = previous_key

    def _params(self, email: OutgoingEmail) -> resend.Emails.SendParams:
        params: resend.Emails.SendParams = {
            "from": self.from_address,
            "to": [email.to],
            "subject": email.subject,
            "html": email.html,
            "text": email.text,
        }
        if email.headers:
            params["headers"] = dict(email.headers)
        if email.tags:
            params["tags"] = [
                {"name": _tag_part(name), "value": _tag_part(value)}
                for name, value in email.tags.items()
            ]
        if self.reply_to:
            params["reply_to"] = self.reply_to
        return params

    def _results(
        self, batch: Sequence[OutgoingEmail], response: dict[str, Any], label: str
    ) -> list[SendResult]:
        errors: dict[int, str] = {}
        for item in response.get("errors") or []:
            index = item.get("index")
            if isinstance(index, int) and 0 <= index < len(batch):
                errors[index] = self._scrub(str(item.get("message") or "invalid email"))
        # In permissive mode `data` lists only the accepted emails, in input order.
        ids = [entry.get("id") for entry in response.get("data") or []]
        if len(ids) != len(batch) - len(errors):
            # Which id is whose is unknown: one handed to the wrong email would file its
            # reader's bounces and complaints under another reader.
            self._log.warning(
                "%s: Resend returned %d ids for %d accepted emails; stored without ids, so "
                "their delivery events cannot be matched",
                label,
                len(ids),
                len(batch) - len(errors),
            )
            ids = []
        accepted_ids = iter(ids)
        results = []
        for index, email in enumerate(batch):
            if index in errors:
                results.append(
                    SendResult(email.key, "failed", None, f"rejected by Resend: {errors[index]}")
                )
            else:
                results.append(SendResult(email.key, "sent", next(accepted_ids, None), None))
        if errors:
            self._log.warning("%s: %d emails rejected individually", label, len(errors))
        return results

    def _classify(self, exc: ResendError | NoContentError) -> _Failure:
        if isinstance(exc, NoContentError):
            return _Failure(
                "Resend returned an empty response", retryable=True, maybe_delivered=True
            )
        message = self._scrub(str(exc.message))
        error_type = self._scrub(str(exc.error_type))
        if error_type == "HttpClientError":
            return _Failure(f"connection error: {message}", retryable=True, maybe_delivered=True)
        try:
            status = int(exc.code)
        except (TypeError, ValueError):
            status = 500
        description = f"HTTP {status} {error_type}: {message}"
        if status == 429:
            if error_type in _QUOTA_ERRORS:
                return _Failure(description, retryable=False, stops_run=True)
            return _Failure(description, retryable=True, retry_after=_retry_after(exc.headers))
        if status == 409 and error_type == "concurrent_idempotent_requests":
            return _Failure(description, retryable=True, maybe_delivered=True)
        if status == 409 and error_type == "invalid_idempotent_request":
            return _Failure(description, retryable=False, already_sent=True)
        if status >= 500:
            return _Failure(description, retryable=True, maybe_delivered=True)
        return _Failure(description, retryable=False, stops_run=status in _AUTH_STATUSES)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_max_seconds, self.backoff_base_seconds * 2 ** (attempt - 1))
        return self._random.uniform(0, ceiling)

    def _scrub(self, text: str) -> str:
        # A proxy or a misbehaving server may echo the request headers back in an error body.
        text = text.replace(self._api_key, "[redacted]")
        return _BEARER.sub("Bearer [redacted]", text)


def _failed(
    batch: Sequence[OutgoingEmail],
    error: str,
    *,
    retryable: bool = False,
    undelivered: bool = False,
) -> list[SendResult]:
    return [SendResult(email.key, "failed", None, error, retryable, undelivered) for email in batch]


def _tag_part(value: str) -> str:
    # Resend rejects tag names and values outside [A-Za-z0-9_-] or longer than 256 characters,
    # and one bad tag would fail the whole email.
    return _TAG_UNSAFE.sub("_", value)[:256] or "_"


def _retry_after(headers: dict[str, str] | None) -> float | None:
    # The SDK copies the response headers into a plain dict, so their case is the server's.
    for name, value in (headers or {}).items():
        if name.lower() == "retry-after":
            try:
                seconds = float(value)
            except ValueError:
                return None
            return max(seconds, 0.0) if math.isfinite(seconds) else None
    return None
