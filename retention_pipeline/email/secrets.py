"""The secrets of the email layer, from the configuration, never from a built-in value.

The unsubscribe secret signs the links in every email and verifies them in `serve`; the webhook
secret verifies Resend's delivery events. Only the demo, whose users are made up, gets a secret
without configuration: a random one, made on first use and kept under $RETENTION_HOME, so links
the demo writes to the outbox verify in a local `serve --demo`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.connection import uses_embedded_database
from retention_pipeline.database.embedded import retention_home

UNSUBSCRIBE_SECRET_VARIABLE = "RETENTION_UNSUBSCRIBE_SECRET"
WEBHOOK_SECRET_VARIABLE = "RESEND_WEBHOOK_SECRET"
DEMO_SECRET_FILE = "unsubscribe_secret"


class MissingSecretError(ValueError):
    """A secret the command needs is not configured; the message names the variable."""


def unsubscribe_secret(config: RetentionConfig) -> str:
    """The HMAC secret of the unsubscribe links: in the demo its own random one, whatever the
    environment holds (a production secret left exported would sign made-up users' links that
    production's `serve` accepts, in outbox files anyone may read); else
    `email.unsubscribe_secret`."""
    if uses_embedded_database(config):
        return _demo_secret(retention_home() / DEMO_SECRET_FILE)
    if config.email.unsubscribe_secret:
        return config.email.unsubscribe_secret
    raise MissingSecretError(
        "email.unsubscribe_secret: required to sign and check unsubscribe links "
        f"(set ${UNSUBSCRIBE_SECRET_VARIABLE})"
    )


def webhook_secret(config: RetentionConfig) -> str:
    """The signing secret of the Resend webhook endpoint (`whsec_` and base64), checked here so a
    mistyped one stops `serve` rather than failing every event."""
    configured = config.email.webhook_secret
    if not configured:
        raise MissingSecretError(
            "email.webhook_secret: required to verify Resend's delivery events "
            f"(set ${WEBHOOK_SECRET_VARIABLE} to the signing secret Resend shows for the webhook)"
        )
    try:
        key = base64.b64decode(configured.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        # The value itself stays out of the message: it is a secret, however mistyped.
        raise MissingSecretError(
            f"email.webhook_secret: ${WEBHOOK_SECRET_VARIABLE} is not a Resend signing secret "
            "(expected whsec_ followed by base64)"
        )
    return configured


def _demo_secret(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, draft = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "w") as file:  # mkstemp makes it readable by its owner only
            file.write(secrets.token_urlsafe(32))
        # A link never replaces a file: of two processes starting at once, one secret wins.
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
        os.unlink(draft)
    return path.read_text().strip()
