"""Binds the resource classes of `retention_pipeline.resources` to the keys every asset, job and
sensor asks for (`app_database`, `email`), choosing the email sender from the configuration."""

import dagster as dg

from retention_pipeline.config import RetentionConfig
from retention_pipeline.database.embedded import retention_home
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import (
    RESEND_KEY_ENV_VAR,
    OutboxEmail,
    ResendEmail,
    email_provider,
    missing_resend_key,
)


def resource_bindings(config: RetentionConfig) -> dict[str, object]:
    """The resources of this configuration: the app database reads no second copy of it."""
    email = config.email
    if email_provider(config) == "resend":
        sender = ResendEmail(
            # The key stays an environment reference: the UI shows its name, never its value.
            # Unset, it is left out, so the definitions still load and every send run stops
            # with one line naming it instead of sending elsewhere.
            api_key=None if missing_resend_key(config) else dg.EnvVar(RESEND_KEY_ENV_VAR),
            from_address=email.from_address,
            reply_to=email.reply_to,
            requests_per_second=email.requests_per_second,
        )
    else:
        directory = email.outbox_dir or str(retention_home() / "outbox")
        sender = OutboxEmail(directory=directory, from_address=email.from_address)
    # Handed to the assets as is: a resource rebuilt from its fields would load the file again.
    app_database = dg.ResourceDefinition.hardcoded_resource(
        AppDatabase.of(config), description=AppDatabase.__doc__
    )
    return {"app_database": app_database, "email": sender}
