"""ResendSender against a real local HTTP server that speaks Resend's batch API."""

from __future__ import annotations

import logging
import random
import socket

import pytest
import resend

from retention_pipeline.email.message import OutgoingEmail
from retention_pipeline.email.resend_sender import (
    JITTER_MARGIN_SECONDS,
    ResendSender,
    batch_idempotency_key,
)
from retention_pipeline_tests.email.fake_resend import FakeClock, FakeResend, serve_fake_resend

API_KEY = "re_test_SECRET_abc123"


def make_emails(count: int, invalid: set[int] = frozenset()) -> list[OutgoingEmail]:
    return [
        OutgoingEmail(
            key=f"re_engagement:{n}:2026-11-20:1",
            to=f"user{n}@{'invalid' if n in invalid else 'example'}.com",
            subject=f"We miss you, user {n}",
            html=f"<p>Hello user {n}</p>",
            text=f"Hello user {n}",
            headers={"List-Unsubscribe": f"<https://example.com/u?token={n}>"},
            tags={"loop": "re_engagement", "send_key": f"re_engagement:{n}"},
        )
        for n in range(count)
    ]


# For tests of the retries: their waits alone, not the pacing's between requests.
UNPACED = {"requests_per_second": 1e9}


def make_sender(clock: FakeClock, **overrides: object) -> ResendSender:
    options: dict[str, object] = {"sleep": clock.sleep, "clock": clock}
    options.update(overrides)
    return ResendSender(API_KEY, "Acme <hello@acme.test>", **options)


def test_250_emails_go_out_as_100_100_50_in_input_order(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    emails = make_emails(250)

    results = make_sender(fake_clock).send(emails)

    assert [len(request.emails) for request in fake_resend.requests] == [100, 100, 50]
    for number, request in enumerate(fake_resend.requests):
        chunk = emails[number * 100 : (number + 1) * 100]
        # Split in input order; inside a batch, sorted by key so the payload is order-independent.
        assert [email["to"][0] for email in request.emails] == [
            email.to for email in sorted(chunk, key=lambda email: email.key)
        ]
    assert [result.key for result in results] == [email.key for email in emails]
    assert all(result.status == "sent" and result.error is None for result in results)
    assert not any(result.retryable for result in results)
    assert {result.provider_id for result in results} == {e["id"] for e in fake_resend.delivered}
    for number, request in enumerate(fake_resend.requests):
        batch = emails[number * 100 : (number + 1) * 100]
        assert request.idempotency_key == batch_idempotency_key(email.key for email in batch)
        assert request.headers["x-batch-validation"] == "permissive"
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
    first = fake_resend.requests[0].emails[0]
    assert first["from"] == "Acme <hello@acme.test>"
    assert first["headers"] == {"List-Unsubscribe": "<https://example.com/u?token=0>"}
    # Resend only accepts [A-Za-z0-9_-] in tags, so ":" must not reach it.
    assert first["tags"] == [
        {"name": "loop", "value": "re_engagement"},
        {"name": "send_key", "value": "re_engagement_0"},
    ]


def test_429_waits_retry_after_then_retries(fake_resend: FakeResend, fake_clock: FakeClock) -> None:
    fake_resend.rate_limit_next(1, retry_after=1)

    results = make_sender(fake_clock).send(make_emails(3))

    assert fake_clock.sleeps == [1.0]
    assert [request.status for request in fake_resend.requests] == [429, 200]
    assert [result.status for result in results] == ["sent"] * 3
    assert fake_resend.delivered_count == 3


class CeilingJitter(random.Random):
    """Always waits the longest full jitter allows, so the backoff ceiling is observable."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_500_twice_then_success_sends_every_email_exactly_once(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    fake_resend.fail_next(2, status=500)
    emails = make_emails(5)

    sender = make_sender(fake_clock, **UNPACED, backoff_base_seconds=0.5, rng=CeilingJitter())
    results = sender.send(emails)

    assert [request.status for request in fake_resend.requests] == [500, 500, 200]
    assert [result.status for result in results] == ["sent"] * 5
    assert sorted(fake_resend.delivered_to()) == sorted(email.to for email in emails)
    assert fake_resend.delivered_count == 5
    assert fake_clock.sleeps == [0.5, 1.0]


def test_backoff_doubles_up_to_its_maximum_with_full_jitter(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    fake_resend.fail_next(4, status=502, name="bad_gateway")
    ceiling = make_sender(
        fake_clock,
        **UNPACED,
        backoff_base_seconds=0.5,
        backoff_max_seconds=1.5,
        rng=CeilingJitter(),
    )
    ceiling.send(make_emails(1))
    assert fake_clock.sleeps == [0.5, 1.0, 1.5, 1.5]

    fake_resend.fail_next(5, status=500)
    jittered = FakeClock()
    make_sender(jittered, **UNPACED, backoff_max_seconds=4).send(make_emails(1))
    assert len(jittered.sleeps) >= 5
    assert all(0 <= seconds <= 4 for seconds in jittered.sleeps)


def test_a_retry_reuses_the_same_idempotency_key(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    fake_resend.fail_next(1, status=503, name="service_unavailable")
    emails = make_emails(2)

    make_sender(fake_clock).send(emails)

    keys = [request.idempotency_key for request in fake_resend.requests]
    assert keys == [batch_idempotency_key(email.key for email in emails)] * 2


def test_sending_the_same_emails_again_is_deduplicated_by_the_idempotency_key(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    emails = make_emails(3)
    sender = make_sender(fake_clock)

    first = sender.send(emails)
    # Another run (say after a crash) re-renders the same emails, in another order.
    second = sender.send(list(reversed(emails)))

    assert fake_resend.delivered_count == 3
    assert fake_resend.requests[1].replayed
    assert {r.key: r.provider_id for r in first} == {r.key: r.provider_id for r in second}


def test_an_invalid_address_fails_alone(fake_resend: FakeResend, fake_clock: FakeClock) -> None:
    emails = make_emails(5, invalid={2})

    results = make_sender(fake_clock).send(emails)

    assert [result.status for result in results] == ["sent", "sent", "failed", "sent", "sent"]
    assert results[2].provider_id is None
    assert "Invalid `to` field" in results[2].error
    # Sending the same invalid address again cannot succeed: the failure is final.
    assert not results[2].retryable
    assert all(result.error is None for n, result in enumerate(results) if n != 2)
    assert len(fake_resend.requests) == 1
    assert fake_resend.delivered_count == 4
    assert {result.provider_id for result in results if result.status == "sent"} == {
        email["id"] for email in fake_resend.delivered
    }


def test_an_answer_whose_ids_do_not_add_up_gives_no_email_another_ones_id(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    """Ids handed out in order past a missing one would name the wrong rows, and a complaint
    about one reader would then suppress another."""
    fake_resend.leave_out_an_id_next()

    results = make_sender(fake_clock).send(make_emails(3))

    assert [result.status for result in results] == ["sent", "sent", "sent"]
    assert [result.provider_id for result in results] == [None, None, None]
    assert fake_resend.delivered_count == 3


def test_requests_are_paced_to_two_per_second(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    sender = make_sender(fake_clock, requests_per_second=2.0)

    for email in make_emails(5):
        sender.send([email])

    assert len(fake_resend.requests) == 5
    # Half a second apart, and the margin for the time a request takes to arrive.
    assert fake_clock.sleeps == pytest.approx([0.5 + JITTER_MARGIN_SECONDS] * 4)


def test_a_late_wake_up_does_not_bring_the_next_request_closer(fake_resend: FakeResend) -> None:
    oversleeping = FakeClock()

    def sleep(seconds: float) -> None:
        oversleeping.sleep(seconds + 0.2)  # a busy machine wakes the sender late

    sender = ResendSender("re_test", "Acme <hello@acme.test>", 2.0, sleep=sleep, clock=oversleeping)
    for email in make_emails(3):
        sender.send([email])

    # Each wait is the whole interval after the request before really started.
    assert oversleeping.sleeps == pytest.approx([0.7 + JITTER_MARGIN_SECONDS] * 2)


def test_server_errors_give_up_after_max_attempts_without_raising(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    fake_resend.fail_next(10, status=500)

    results = make_sender(fake_clock, **UNPACED, max_attempts=3, rng=CeilingJitter()).send(
        make_emails(4)
    )

    assert len(fake_resend.requests) == 3
    assert len(fake_clock.sleeps) == 2
    assert all(result.status == "failed" for result in results)
    assert all(result.retryable for result in results)
    assert "gave up after 3 attempts" in results[0].error
    assert "HTTP 500" in results[0].error
    assert fake_resend.delivered_count == 0


def test_rate_limiting_that_outlasts_max_attempts_is_retryable(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    fake_resend.rate_limit_next(10, retry_after=2)

    results = make_sender(fake_clock, max_attempts=3).send(make_emails(2))

    assert fake_clock.sleeps == [2.0, 2.0]
    assert [result.status for result in results] == ["failed", "failed"]
    assert all(result.retryable for result in results)
    assert "HTTP 429 rate_limit_exceeded" in results[0].error


@pytest.mark.parametrize(("status", "name"), [(422, "validation_error"), (400, "validation_error")])
def test_a_validation_error_is_never_retried(
    fake_resend: FakeResend, fake_clock: FakeClock, status: int, name: str
) -> None:
    fake_resend.fail_next(1, status=status, name=name, message="The `from` field is invalid.")

    results = make_sender(fake_clock).send(make_emails(2))

    assert len(fake_resend.requests) == 1
    assert fake_clock.sleeps == []
    assert all(result.status == "failed" and not result.retryable for result in results)
    assert results[0].error == (
        f"rejected by Resend: HTTP {status} validation_error: The `from` field is invalid."
    )


def test_a_quota_429_stops_the_send_and_leaves_every_email_retryable(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    fake_resend.fail_next(1, status=429, name="daily_quota_exceeded", message="Daily quota hit.")

    results = make_sender(fake_clock).send(make_emails(150))

    assert len(fake_resend.requests) == 1
    assert fake_clock.sleeps == []
    assert all(result.status == "failed" and result.retryable for result in results)
    assert "daily_quota_exceeded" in results[0].error


def test_connection_errors_are_retried_then_reported(
    monkeypatch: pytest.MonkeyPatch, fake_clock: FakeClock
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setattr(resend, "api_url", f"http://127.0.0.1:{closed_port}")

    results = make_sender(fake_clock, **UNPACED, max_attempts=4, rng=CeilingJitter()).send(
        make_emails(2)
    )

    assert fake_clock.sleeps == [0.5, 1.0, 2.0]
    assert all(result.status == "failed" and result.retryable for result in results)
    assert "connection error" in results[0].error
    assert "gave up after 4 attempts" in results[0].error


def test_a_rejected_api_key_fails_every_batch_after_one_request(fake_clock: FakeClock) -> None:
    with serve_fake_resend(api_key="re_the_right_key") as fake:
        results = make_sender(fake_clock).send(make_emails(250))

    assert len(fake.requests) == 1
    assert len(results) == 250
    # Nothing was sent: once the key is fixed, a retry sends all of them.
    assert all(result.status == "failed" and result.retryable for result in results)
    assert "HTTP 403 invalid_api_key" in results[-1].error
    assert all(result.undelivered for result in results)


def test_a_refusal_after_a_server_error_may_still_have_been_delivered(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    # The first request's outcome is unknown (Resend may have taken the batch before failing);
    # the key revoked meanwhile refuses the second.
    fake_resend.fail_next(1, status=503, name="service_unavailable")
    fake_resend.fail_next(1, status=403, name="invalid_api_key", message="API key is invalid")

    results = make_sender(fake_clock, **UNPACED).send(make_emails(3))

    assert len(fake_resend.requests) == 2
    assert all(result.retryable and not result.undelivered for result in results)
    assert "HTTP 403 invalid_api_key" in results[0].error


def test_the_api_key_never_appears_in_errors_logs_or_repr(
    fake_resend: FakeResend, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_resend.fail_next(3, status=500, echo_authorization=True)
    fake_resend.fail_next(1, status=422, name="validation_error", echo_authorization=True)
    sender = make_sender(fake_clock, max_attempts=3)

    results = sender.send(make_emails(150))

    # The server did see the key and did echo it: the scrubbing is what keeps it out.
    assert fake_resend.requests[0].headers["authorization"] == f"Bearer {API_KEY}"
    assert [request.status for request in fake_resend.requests] == [500, 500, 500, 422]
    assert all(result.status == "failed" for result in results)
    assert "[redacted]" in results[0].error
    assert "[redacted]" in caplog.text
    for text in [*(result.error or "" for result in results), caplog.text, repr(sender)]:
        assert API_KEY not in text
        assert "SECRET" not in text


def test_the_sdk_global_api_key_is_left_as_it_was(
    fake_resend: FakeResend, fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resend, "api_key", None)

    make_sender(fake_clock).send(make_emails(1))

    assert fake_resend.delivered_count == 1
    assert resend.api_key is None


def test_nothing_to_send_makes_no_request(fake_resend: FakeResend, fake_clock: FakeClock) -> None:
    assert make_sender(fake_clock).send([]) == []
    assert fake_resend.requests == []


def test_duplicate_keys_are_a_caller_error(fake_resend: FakeResend, fake_clock: FakeClock) -> None:
    email = make_emails(1)[0]

    with pytest.raises(ValueError, match="duplicate send keys"):
        make_sender(fake_clock).send([email, email])
    assert fake_resend.requests == []


def test_the_idempotency_key_ignores_order_and_fits_resends_limit() -> None:
    key = batch_idempotency_key(["b", "a"])

    assert key == batch_idempotency_key(["a", "b"])
    assert key != batch_idempotency_key(["a,b"])
    assert len(key) <= 256


def test_same_key_with_another_payload_counts_as_sent_and_is_not_sent_twice(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    emails = make_emails(2)
    sender = make_sender(fake_clock)
    sender.send(emails, idempotency_key="retention-batch/stored-at-claim")
    # The same batch less a member withheld since: Resend refuses the key with this payload.
    results = sender.send(emails[1:], idempotency_key="retention-batch/stored-at-claim")

    assert [request.status for request in fake_resend.requests] == [200, 409]
    assert fake_resend.delivered_count == 2
    # The key's earlier request was accepted and held this email: retrying cannot help.
    [result] = results
    assert (result.status, result.provider_id, result.retryable) == ("sent", None, False)
    assert "earlier request" in result.error and "invalid_idempotent_request" in result.error


def test_one_idempotency_key_never_spans_two_requests(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    with pytest.raises(ValueError, match="one request takes 100"):
        make_sender(fake_clock).send(make_emails(101), idempotency_key="retention-batch/one")
    assert fake_resend.requests == []


def test_a_concurrent_request_with_the_same_key_is_retried(
    fake_resend: FakeResend, fake_clock: FakeClock
) -> None:
    fake_resend.fail_next(1, status=409, name="concurrent_idempotent_requests")

    results = make_sender(fake_clock).send(make_emails(1))

    assert [request.status for request in fake_resend.requests] == [409, 200]
    assert results[0].status == "sent"
