"""Where emails go: Resend, or a local outbox folder when that is the explicit choice."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from retention_pipeline.config.loader import project_root
from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.connection import uses_embedded_database
from retention_pipeline.email.message import EmailSender
from retention_pipeline.email.outbox import OutboxSender, remove_from_outbox
from retention_pipeline.email.resend_sender import Pacer, ResendSender

RESEND_KEY_ENV_VAR = "RESEND_API_KEY"
MISSING_RESEND_KEY = (
    f"{RESEND_KEY_ENV_VAR} is not set: email.provider is resend, so no email can be sent "
    "(set it, or choose email.provider: outbox to write emails to files instead)"
)


def email_provider(config: RetentionConfig) -> Literal["resend", "outbox"]:
    """Where this configuration's emails go. The outbox is always a choice, never a fallback:
    `email.provider: outbox`, or the embedded demo database (no database URL), whose users are
    made up."""
    if config.email.provider == "outbox" or uses_embedded_database(config):
        return "outbox"
    return "resend"


def missing_resend_key(config: RetentionConfig) -> str | None:
    """The one line saying why a send run of this configuration would stop, or None."""
    if email_provider(config) == "resend" and not os.environ.get(RESEND_KEY_ENV_VAR):
        return MISSING_RESEND_KEY
    return None


class EmailResource(dg.ConfigurableResource):
    """Something that sends emails; the send job only knows this."""

    @property
    def provider(self) -> str:
        raise NotImplementedError

    def sender(
        self,
        log: logging.Logger | None = None,
        shared_pace: Callable[[float], Pacer] | None = None,
    ) -> EmailSender:
        """The sender of a run; raises a `dg.Failure` naming what is missing before anything is
        claimed. `log` receives the sender's retries and waits. `shared_pace`, given the
        provider's requests per second, makes the pacer this sender shares with other runs'."""
        raise NotImplementedError

    def forget(self, keys: Sequence[str]) -> int:
        """Delete what this provider keeps here of these emails (their user was erased);
        returns how many files went."""
        return 0


class ResendEmail(EmailResource):
    """Sends through Resend's batch endpoint (honours $RESEND_API_URL), paced and retried."""

    api_key: str | None = Field(
        description="Resend API key; give it as EnvVar('RESEND_API_KEY'). Unset, every send run "
        "stops before claiming anything."
    )
    from_address: str
    reply_to: str | None = None
    requests_per_second: float = 2.0

    @property
    def provider(self) -> str:
        return "resend"

    def sender(
        self,
        log: logging.Logger | None = None,
        shared_pace: Callable[[float], Pacer] | None = None,
    ) -> EmailSender:
        if not self.api_key:
            raise dg.Failure(description=MISSING_RESEND_KEY, allow_retries=False)
        return ResendSender(
            api_key=self.api_key,
            from_address=self.from_address,
            reply_to=self.reply_to,
            requests_per_second=self.requests_per_second,
            pacer=shared_pace(self.requests_per_second) if shared_pace else None,
            **({"log": log} if log else {}),
        )


class OutboxEmail(EmailResource):
    """Writes every email as a file to open in a browser: `email.provider: outbox`, and the
    embedded demo database."""

    directory: str
    from_address: str

    @property
    def provider(self) -> str:
        return "outbox"

    def sender(
        self,
        log: logging.Logger | None = None,
        shared_pace: Callable[[float], Pacer] | None = None,
    ) -> EmailSender:
        self.path.mkdir(parents=True, exist_ok=True)
        return OutboxSender(self.path, from_address=self.from_address)

    def forget(self, keys: Sequence[str]) -> int:
        return remove_from_outbox(self.path, keys)

    @property
    def path(self) -> Path:
        path = Path(self.directory)
        return path if path.is_absolute() else project_root() / path
