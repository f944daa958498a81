"""Resources shared by every asset, job and sensor."""

import os

import dagster as dg

from retention_pipeline.config import load_config
from retention_pipeline.database.embedded import retention_home
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import RESEND_KEY_ENV_VAR, OutboxEmail, ResendEmail


@dg.definitions
def resources() -> dg.Definitions:
    email = load_config().email
    if email.provider == "resend" and os.environ.get(RESEND_KEY_ENV_VAR):
        # The key stays an environment reference: the UI shows its name, never its value.
        sender = ResendEmail(
            api_key=dg.EnvVar(RESEND_KEY_ENV_VAR),
            from_address=email.from_address,
            reply_to=email.reply_to,
            requests_per_second=email.requests_per_second,
        )
    else:
        directory = email.outbox_dir or str(retention_home() / "outbox")
        sender = OutboxEmail(directory=directory, from_address=email.from_address)
    return dg.Definitions(resources={"app_database": AppDatabase(), "email": sender})
