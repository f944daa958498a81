"""The email layer: templates, rendering, unsubscribe links and senders (Resend or a local outbox).

Plain Python, no Dagster: the `defs` modules wire it into the send job.
"""

from retention_pipeline.email.humanize import describe_action
from retention_pipeline.email.message import EmailSender, OutgoingEmail, SendResult
from retention_pipeline.email.outbox import OutboxSender
from retention_pipeline.email.render import (
    TEMPLATE_NAMES,
    RenderedEmail,
    UnknownTemplateError,
    render_email,
)
from retention_pipeline.email.resend_sender import ResendSender, batch_idempotency_key
from retention_pipeline.email.unsubscribe import (
    InvalidUnsubscribeTokenError,
    make_token,
    unsubscribe_headers,
    unsubscribe_url,
    verify_token,
)

__all__ = [
    "TEMPLATE_NAMES",
    "EmailSender",
    "InvalidUnsubscribeTokenError",
    "OutboxSender",
    "OutgoingEmail",
    "RenderedEmail",
    "ResendSender",
    "SendResult",
    "UnknownTemplateError",
    "batch_idempotency_key",
    "describe_action",
    "make_token",
    "render_email",
    "unsubscribe_headers",
    "unsubscribe_url",
    "verify_token",
]
