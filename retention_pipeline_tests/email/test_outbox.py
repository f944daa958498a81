"""OutboxSender writes one readable HTML page and one .eml per send key."""

from __future__ import annotations

from email import message_from_bytes, policy
from pathlib import Path

from retention_pipeline.email.message import OutgoingEmail
from retention_pipeline.email.outbox import OutboxSender


def make_email(
    key: str = "re_engagement:42:2026-11-20:1", subject: str = "We miss you"
) -> OutgoingEmail:
    return OutgoingEmail(
        key=key,
        to="ada@example.com",
        subject=subject,
        html='<!DOCTYPE html><html><body><p style="color: red">Hi Ada & co</p></body></html>',
        text="Hi Ada & co\n",
        headers={
            "List-Unsubscribe": "<https://acme.test/unsubscribe?token=abc>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
        tags={"loop": "re_engagement"},
    )


def test_each_email_becomes_one_page_and_one_eml(tmp_path: Path) -> None:
    emails = [make_email(f"re_engagement:{n}:2026-11-20:1") for n in range(3)]

    results = OutboxSender(tmp_path).send(emails)

    assert [result.status for result in results] == ["sent"] * 3
    assert [result.key for result in results] == [email.key for email in emails]
    pages = sorted(path.name for path in tmp_path.glob("*.html"))
    assert sorted(result.provider_id for result in results) == [f"outbox:{name}" for name in pages]
    assert len(list(tmp_path.glob("*.eml"))) == 3
    assert len(list(tmp_path.iterdir())) == 6


def test_the_page_shows_the_envelope_and_embeds_the_email(tmp_path: Path) -> None:
    email = make_email(subject="Ada, <b>we</b> miss you")

    [result] = OutboxSender(tmp_path).send([email])

    page = (tmp_path / result.provider_id.removeprefix("outbox:")).read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<th>To</th><td>ada@example.com</td>" in page
    assert "<th>Subject</th><td>Ada, &lt;b&gt;we&lt;/b&gt; miss you</td>" in page
    assert "<th>List-Unsubscribe-Post</th><td>List-Unsubscribe=One-Click</td>" in page
    assert "<th>Send key</th><td>re_engagement:42:2026-11-20:1</td>" in page
    # The email is isolated in an iframe: its markup is escaped into srcdoc, not mixed in.
    assert (
        'srcdoc="&lt;!DOCTYPE html&gt;&lt;html&gt;&lt;body&gt;&lt;p style=&quot;color: red' in page
    )
    assert "Hi Ada &amp; co" in page


def test_the_eml_is_a_complete_message(tmp_path: Path) -> None:
    [result] = OutboxSender(tmp_path, from_address="Acme <hello@acme.test>").send([make_email()])

    [eml] = tmp_path.glob("*.eml")
    message = message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert message["From"] == "Acme <hello@acme.test>"
    assert message["To"] == "ada@example.com"
    assert message["Subject"] == "We miss you"
    assert message["List-Unsubscribe"] == "<https://acme.test/unsubscribe?token=abc>"
    assert message["X-Send-Key"] == "re_engagement:42:2026-11-20:1"
    assert message.get_body(("plain",)).get_content() == "Hi Ada & co\n"
    assert "Hi Ada & co" in message.get_body(("html",)).get_content()
    assert eml.stem == Path(result.provider_id.removeprefix("outbox:")).stem


def test_sending_the_same_key_again_overwrites(tmp_path: Path) -> None:
    sender = OutboxSender(tmp_path)
    [first] = sender.send([make_email(subject="First version")])

    [second] = sender.send([make_email(subject="Second version")])

    assert first.provider_id == second.provider_id
    assert len(list(tmp_path.iterdir())) == 2
    page = (tmp_path / second.provider_id.removeprefix("outbox:")).read_text()
    assert "Second version" in page
    assert "First version" not in page


def test_keys_never_escape_the_directory_or_collide(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    keys = ["../../etc/passwd", "a:b", "a/b", "a_b", "A_B", ""]

    results = OutboxSender(outbox).send([make_email(key) for key in keys])

    assert all(result.status == "sent" for result in results)
    assert len({result.provider_id for result in results}) == len(keys)
    assert sorted(path.parent for path in tmp_path.rglob("*.*")) == [outbox] * 2 * len(keys)


def test_a_header_with_a_line_break_fails_that_email_only(tmp_path: Path) -> None:
    bad = OutgoingEmail("bad", "x@example.com", "Hi", "<p>x</p>", "x", {"X-Evil": "a\r\nBcc: y"})

    results = OutboxSender(tmp_path).send([bad, make_email()])

    assert [result.status for result in results] == ["failed", "sent"]
    assert results[0].error.startswith("outbox:")
    assert len(list(tmp_path.iterdir())) == 2


def test_the_eml_has_a_date_a_stable_message_id_and_a_bare_unsubscribe_url(
    tmp_path: Path,
) -> None:
    long_link = (
        "<https://app.acme.test/unsubscribe?token=" + "eyJ1IjoidTEifQ" * 8 + ".c2lnbmF0dXJl>"
    )
    email = OutgoingEmail(**{**make_email().__dict__, "headers": {"List-Unsubscribe": long_link}})

    OutboxSender(tmp_path, from_address="Acme <hello@acme.test>").send([email])
    (eml,) = tmp_path.glob("*.eml")
    raw = eml.read_bytes()
    OutboxSender(tmp_path, from_address="Acme <hello@acme.test>").send([email])

    assert f"List-Unsubscribe: {long_link}\n".encode() in raw  # one line, no =?utf-8?q?
    message = message_from_bytes(raw, policy=policy.default)
    assert message["Date"].datetime.tzinfo is not None
    assert message["Message-ID"].endswith("@acme.test>")
    rewritten = message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert rewritten["Message-ID"] == message["Message-ID"]
