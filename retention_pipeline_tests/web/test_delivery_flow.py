"""Delivery feedback end to end: Dagster sends a day's emails through (a local stand-in for)
Resend, Resend reports on them to `serve` over HTTP (one bounced, one it did not send since the
address is on its own suppression list), a reader unsubscribes with the link in their email, and
the suppression list and the send log's metadata show it; the emailed day, built again, keeps
its assignments."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
from sqlalchemy import text

from retention_pipeline.defs.audience import AUDIENCE
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import ResendEmail
from retention_pipeline_tests.email.fake_resend import serve_fake_resend
from retention_pipeline_tests.helpers import (
    TEST_UNSUBSCRIBE_SECRET,
    demo_until_yesterday,
    shipped_asset,
    shipped_job,
    treated,
    write_config,
)
from retention_pipeline_tests.web.support import call, resend_event, serving, signed

SEND_LOG = dg.AssetKey(["retention", "email_send_log"])

user_activity_snapshot = shipped_asset(SNAPSHOT)
engagement_segments = shipped_asset(SEGMENTS)
reengagement_audience = shipped_asset(AUDIENCE)
# the shipped configuration has one loop
send_re_engagement = shipped_job("send_re_engagement")


def send_log_materializations(result: dg.ExecuteInProcessResult, day: str) -> list:
    return [
        event.event_specific_data.materialization
        for event in result.all_events
        if event.event_type_value == "ASSET_MATERIALIZATION"
        and event.event_specific_data.materialization.asset_key == SEND_LOG
        and event.event_specific_data.materialization.partition == day
    ]


def test_bounces_resends_refusals_and_unsubscribes_are_suppressed_and_the_emailed_day_stays_built(
    create_database, tmp_path: Path
) -> None:
    url = create_database()
    engine, day = demo_until_yesterday(url)
    partition = day.isoformat()
    resources = {
        "app_database": AppDatabase(
            config_path=str(write_config(tmp_path, url, email={"provider": "resend"}))
        ),
        "email": ResendEmail(
            api_key="re_test_key", from_address="Acme <hello@acme.test>", requests_per_second=1e3
        ),
    }
    send_partition = f"{partition}|0"
    with dg.instance_for_test() as instance, serve_fake_resend() as resend_api:
        assert dg.materialize(
            [user_activity_snapshot, engagement_segments, reengagement_audience],
            partition_key=partition,
            instance=instance,
            resources=resources,
        ).success
        audience = treated(engine, partition)
        assert send_re_engagement.execute_in_process(
            partition_key=send_partition, instance=instance, resources=resources
        ).success

        # What Resend received: the one-click header as a bare <https://...>, never encoded.
        unsubscribe_links = {
            email["to"][0]: email["headers"]["List-Unsubscribe"] for email in resend_api.delivered
        }
        assert len(unsubscribe_links) == len(audience) > 3
        for link in unsubscribe_links.values():
            assert link.startswith("<https://app.northwind-notes.com/unsubscribe?token=")
            assert link.endswith(">") and "=?" not in link
        with engine.connect() as connection:
            (
                (bouncer, bouncer_email, bouncer_id),
                (leaver, leaver_email, leaver_id),
                (listed, listed_email, listed_id),
            ) = connection.execute(
                text(
                    "SELECT user_id, email, provider_id FROM retention.email_send_log "
                    "ORDER BY user_id LIMIT 3"
                )
            ).all()
        assert {bouncer, leaver, listed} <= audience

        with serving(
            engine,
            schema="retention",
            unsubscribe_secret=TEST_UNSUBSCRIBE_SECRET,
            journal=tmp_path / "unsubscribe_journal.jsonl",
        ) as server:
            reports = [
                ("msg_1", resend_event("email.delivered", leaver_id, leaver_email)),
                ("msg_2", resend_event("email.opened", leaver_id, leaver_email)),
                (
                    "msg_3",
                    resend_event(
                        "email.bounced",
                        bouncer_id,
                        bouncer_email,
                        bounce={"type": "Permanent", "subType": "General", "message": "550"},
                    ),
                ),
                (
                    "msg_4",
                    resend_event(
                        "email.suppressed",
                        listed_id,
                        listed_email,
                        suppressed={
                            "type": "OnAccountSuppressionList",
                            "message": "Resend has suppressed sending to this address",
                        },
                    ),
                ),
            ]
            for delivery_id, payload in reports:
                assert (
                    call(server, "POST", "/webhooks/resend", *signed(payload, delivery_id)).status
                    == 200
                )
            # The reader's mail client posts to the link of the email itself (RFC 8058).
            link = urlsplit(unsubscribe_links[leaver_email].strip("<>"))
            one_click = call(
                server,
                "POST",
                f"{link.path}?{link.query}",
                b"List-Unsubscribe=One-Click",
                {"content-type": "application/x-www-form-urlencoded"},
            )
            assert one_click.status == 200

        with engine.connect() as connection:
            suppressed = dict(
                connection.execute(
                    text("SELECT user_id, reason FROM retention.email_suppressions")
                ).all()
            )
        assert suppressed == {bouncer: "bounced", leaver: "unsubscribed", listed: "bounced"}
        # The day was emailed: built again, it keeps every assignment (intention to treat);
        # the list keeps the three out of every audience and send from now on.
        rebuilt = dg.materialize(
            [reengagement_audience], partition_key=partition, instance=instance, resources=resources
        )
        assert rebuilt.success
        assert treated(engine, partition) == audience

        # The next send run reports the day again, with what Resend said about its emails.
        again = send_re_engagement.execute_in_process(
            partition_key=send_partition, instance=instance, resources=resources
        )
        assert again.success
        (report,) = send_log_materializations(again, partition)
        # Under its loop's name: every loop's counts share the partition.
        delivery = {
            key.removeprefix("re_engagement/delivery/"): value.value
            for key, value in report.metadata.items()
            if key.startswith("re_engagement/delivery/")
        }
        assert delivery == {
            "delivered": 1,
            "bounced": 1,
            "complained": 0,
            "suppressed": 1,
            "opened": 1,
            "clicked": 0,
        }
        with engine.connect() as connection:
            last = dict(
                connection.execute(
                    text(
                        "SELECT user_id, last_event FROM retention.email_send_log "
                        "WHERE user_id IN (:a, :b, :c)"
                    ),
                    {"a": bouncer, "b": leaver, "c": listed},
                ).all()
            )
            suppression_detail = connection.execute(
                text("SELECT detail FROM retention.email_events WHERE event_type = 'suppressed'")
            ).scalar_one()
        assert last == {bouncer: "bounced", leaver: "opened", listed: "suppressed"}
        assert suppression_detail == {
            "suppressed_type": "OnAccountSuppressionList",
            "suppressed": "Resend has suppressed sending to this address",
        }
    engine.dispose()
