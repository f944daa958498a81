"""Where emails go: Resend in production, a local outbox folder without an API key."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dagster as dg
from pydantic import Field

from retention_pipeline.config.loader import project_root
from retention_pipeline.email.message import EmailSender
from retention_pipeline.email.outbox import OutboxSender, remove_from_outbox
from retention_pipeline.email.resend_sender import ResendSender

RESEND_KEY_ENV_VAR = "RESEND_API_KEY"


class EmailResource(dg.ConfigurableResource):
    """Something that sends emails; the send job only knows this."""

    @property
    def provider(self) -> str:
        raise NotImplementedError

    def sender(self) -> EmailSender:
        raise NotImplementedError

    def forget(self, keys: Sequence[str]) -> int:
        """Delete what this provider keeps here of these emails (their user was erased);
        returns how many files went."""
        return 0


class ResendEmail(EmailResource):
    """Sends through Resend's batch endpoint (honours $RESEND_API_URL), paced and retried."""

    api_key: str = Field(description="Resend API key; give it as EnvVar('RESEND_API_KEY')")
    from_address: str
    reply_to: str | None = None
    requests_per_second: float = 2.0

    @property
    def provider(self) -> str:
        return "resend"

    def sender(self) -> EmailSender:
        return ResendSender(
            api_key=self.api_key,
            from_address=self.from_address,
            reply_to=self.reply_to,
            requests_per_second=self.requests_per_second,
        )


class OutboxEmail(EmailResource):
    """Writes every email as a file to open in a browser: the default with no API key."""

    directory: str
    from_address: str

    @property
    def provider(self) -> str:
        return "outbox"

    def sender(self) -> EmailSender:
        self.path.mkdir(parents=True, exist_ok=True)
        return OutboxSender(self.path, from_address=self.from_address)

    def forget(self, keys: Sequence[str]) -> int:
        return remove_from_outbox(self.path, keys)

    @property
    def path(self) -> Path:
        path = Path(self.directory)
        return path if path.is_absolute() else project_root() / path


# Outbox emails never leave this machine; a fixed secret keeps their links verifiable locally.
LOCAL_UNSUBSCRIBE_SECRET = "retention-pipeline-local-outbox"


def unsubscribe_secret(configured: str | None, provider: str) -> str:
    """The HMAC secret for unsubscribe links: required for real email, optional for the outbox."""
    if configured:
        return configured
    if provider == "outbox":
        return LOCAL_UNSUBSCRIBE_SECRET
    raise dg.Failure(
        description="email.unsubscribe_secret: required to send through Resend "
        "(set $RETENTION_UNSUBSCRIBE_SECRET)",
        allow_retries=False,
    )
