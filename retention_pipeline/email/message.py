"""The values that cross the boundary between rendering, sending and the send log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class OutgoingEmail:
    """One rendered email, ready to hand to a sender.

    `key` is the send-log key (for example `re_engagement:42:2026-11-20:1`): unique per email and
    stable across retries, so a sender can use it to make re-sends harmless.
    """

    key: str
    to: str
    subject: str
    html: str
    text: str
    headers: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    """What happened to one `OutgoingEmail`. `error` says why it failed, or why an email sent has
    no `provider_id`.

    `retryable` marks a failure a later attempt may fix (the sender gave up on a transient error:
    rate limiting, a server error, the connection): the send log keeps such an email claimed, to
    be re-sent in the same batch. Any other failure is final.

    `undelivered` marks a retryable failure the provider certainly did not deliver: every request
    for it was refused whole (a bad key, a spent quota) or none was made. Whether an email was
    delivered decides whether it may still be sent after the provider forgets its idempotency key.
    """

    key: str
    status: Literal["sent", "failed"]
    provider_id: str | None = None
    error: str | None = None
    retryable: bool = False
    undelivered: bool = False


class EmailSender(Protocol):
    def send(
        self, emails: Sequence[OutgoingEmail], *, idempotency_key: str | None = None
    ) -> list[SendResult]:
        """Send every email; return one result per input, in input order, without raising for
        delivery failures (the caller records them).

        `idempotency_key`: the key a stored batch was claimed with; the emails are then that
        batch's (at most one request's worth), and every request for it carries the key, whoever
        was withheld from it since. Without it, the sender derives keys from the send keys.
        """
        ...
