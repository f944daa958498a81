"""`retention-pipeline serve` refuses to start without its secrets, naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from retention_pipeline.cli import main
from retention_pipeline_tests.helpers import write_config
from retention_pipeline_tests.web.support import WEBHOOK_SECRET


@pytest.mark.parametrize(
    ("email", "message"),
    [
        (
            {"unsubscribe_secret": "", "webhook_secret": WEBHOOK_SECRET},
            "error: email.unsubscribe_secret: required to sign and check unsubscribe links "
            "(set $RETENTION_UNSUBSCRIBE_SECRET)\n",
        ),
        (
            {},
            "error: email.webhook_secret: required to verify Resend's delivery events (set "
            "$RESEND_WEBHOOK_SECRET to the signing secret Resend shows for the webhook)\n",
        ),
        (
            {"webhook_secret": "whsec_not base64!"},
            "error: email.webhook_secret: $RESEND_WEBHOOK_SECRET is not a Resend signing secret "
            "(expected whsec_ followed by base64)\n",
        ),
    ],
)
def test_serve_refuses_to_start_without_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], email: dict[str, str], message: str
) -> None:
    # A database URL nobody listens on: the secrets are checked before anything connects.
    config = write_config(tmp_path, "postgresql://postgres@127.0.0.1:1/app", email=email)

    assert main(["--config", str(config), "serve", "--port", "0"]) == 2

    assert capsys.readouterr().err == message
