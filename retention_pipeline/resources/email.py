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
from retention_pipeline.database.embedded import retention_home
from retention_pipeline.email.message import EmailSender
from retention_pipeline.email.outbox import OutboxSender, remove_from_outbox
from retention_pipeline.email.resend_sender import Pacer, ResendSender
from retention_pipeline.email.secrets import MissingSecretError, unsubscribe_secret

RESEND_KEY_ENV_VAR = "RESEND_API_KEY"
MISSING_RESEND_KEY = (
    f"{RESEND_KEY_ENV_VAR} is not set: email.provider is resend, so no email can be sent "
    "(set it, or choose email.provider: outbox to write emails to files instead)"
)


def email_provider(config: RetentionConfig) -> Literal["resend", "outbox"]:
    """Where this configuration's emails go. The outbox is always a choice, never a fallback:
    `email.provider: outbox`, or the demo (its embedded database's users are made up)."""
    if config.email.provider == "outbox" or uses_embedded_database(config):
        return "outbox"
    return "resend"


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

    def missing_setting(self) -> str | None:
        """The one line naming what this sender lacks to send (a key), or None."""
        return None


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

    def missing_setting(self) -> str | None:
        return None if self.api_key else MISSING_RESEND_KEY

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


def email_resource(config: RetentionConfig) -> EmailResource:
    """The sender the definitions bind for this configuration (and `check` judges)."""
    email = config.email
    if email_provider(config) == "outbox":
        directory = email.outbox_dir or str(retention_home() / "outbox")
        return OutboxEmail(directory=directory, from_address=email.from_address)
    return ResendEmail(
        # The key stays an environment reference: the UI shows its name, never its value. Unset,
        # it is left out, so the definitions still load and every send run stops with one line
        # naming it instead of sending elsewhere.
        api_key=dg.EnvVar(RESEND_KEY_ENV_VAR) if os.environ.get(RESEND_KEY_ENV_VAR) else None,
        from_address=email.from_address,
        reply_to=email.reply_to,
        requests_per_second=email.requests_per_second,
    )


def send_run_problems(config: RetentionConfig, email: EmailResource) -> list[str]:
    """Why a send run of `config` through `email` would stop, one line each; empty when it can
    send. The send op asks this before claiming anything, and `check` prints it, so the two never
    disagree. Outside the demo the emails' reader-facing settings must be real (no placeholder);
    links need the unsubscribe secret; Resend needs its key."""
    problems = [] if uses_embedded_database(config) else config.email.placeholder_problems()
    try:
        unsubscribe_secret(config)
    except MissingSecretError as missing:
        problems.append(str(missing))
    missing_key = email.missing_setting()
    if missing_key:
        problems.append(missing_key)
    return problems
