"""The loop configuration: the shipped default and one-line errors for bad values."""

import copy
from pathlib import Path

import dagster as dg
import pytest
import yaml

from retention_pipeline.config import ConfigError, load_config, parse_config
from retention_pipeline.config.loader import project_root
from retention_pipeline.config.models import parse_duration
from retention_pipeline.defs.retries import retry_policy

SHIPPED = project_root() / "retention.yaml"


@pytest.fixture
def document() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def test_shipped_default_reproduces_the_seed_loop():
    config = load_config(SHIPPED, environ={})
    (loop,) = config.loops
    assert loop.type == "retention"
    assert loop.opinion == "Detect dormant users and trigger personalized re-engagement campaigns"
    step = loop.steps[0]
    assert (step.trigger.type, step.trigger.cron) == ("schedule", "0 9 * * *")
    assert step.condition.type == "query"
    assert step.condition.query == (
        "SELECT * FROM users WHERE last_activity_at < NOW() - INTERVAL '7 days' "
        "AND re_engagement_sent = false"
    )
    assert parse_duration(step.condition.timeout).total_seconds() == 600
    assert (step.action.type, step.action.provider, step.action.template) == (
        "email",
        "resend",
        "re_engagement",
    )
    assert step.action.personalization == {
        "name": "{{user.name}}",
        "lastActivity": "{{user.last_activity_at}}",
    }
    policy = retry_policy(loop.recovery)
    assert (policy.max_retries, policy.delay) == (3, 30)
    assert policy.backoff.value == "EXPONENTIAL"
    assert config.database.url is None
    assert config.email.unsubscribe_secret is None
    assert config.email.previous_unsubscribe_secrets == []


def test_environment_references_are_expanded(document):
    config = parse_config(
        document,
        environ={
            "RETENTION_DATABASE_URL": "postgresql://db/app",
            "RETENTION_UNSUBSCRIBE_SECRET": "s3cret",
            "RETENTION_PREVIOUS_UNSUBSCRIBE_SECRET": "0ld",
        },
    )
    assert config.database.url == "postgresql://db/app"
    assert config.email.unsubscribe_secret == "s3cret"
    assert config.email.previous_unsubscribe_secrets == ["0ld"]


def _mutated(document: dict, path: str, value) -> dict:
    changed = copy.deepcopy(document)
    *parents, last = path.split(".")
    target = changed
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[last] = value
    return changed


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "loops.0.steps.0.trigger.cron",
            "0 25 * * *",
            "loops.0.steps.0.trigger.cron: '0 25 * * *' is not a valid cron expression",
        ),
        (
            "loops.0.steps.0.trigger.timezone",
            "Mars/Olympus",
            "loops.0.steps.0.trigger.timezone: 'Mars/Olympus' is not a known IANA timezone",
        ),
        (
            "loops.0.name",
            "re$engagement",
            "loops.0.name: 're$engagement': Dagster names the loop's jobs and schedules after it "
            "(send_<name>), and its names take letters, digits and _ only",
        ),
        (
            "loops.0.steps.0.trigger.timezone",
            "America",
            "loops.0.steps.0.trigger.timezone: 'America' is not a known IANA timezone",
        ),
        (
            "loops.0.steps.0.action.template",
            "win_back",
            "loops.0.steps.0.action.template: unknown template 'win_back'",
        ),
        (
            "loops.0.steps.0.condition.timeout",
            "-10m",
            "loops.0.steps.0.condition.timeout: '-10m' is not a duration",
        ),
        (
            "loops.0.recovery.retries",
            -1,
            "loops.0.recovery.retries: Input should be greater than or equal to 0",
        ),
        ("database.tables.events.columns.colour", "colour", "unknown column key 'colour'"),
        (
            "database.tables.users.table",
            "users; DROP TABLE users",
            "database.tables.users.table: 'users; DROP TABLE users' is not a valid SQL identifier",
        ),
        (
            "email.requests_per_second",
            0,
            "email.requests_per_second: Input should be greater than 0",
        ),
        ("email.send_shards", 0, "email.send_shards: Input should be greater than or equal to 1"),
        ("email.send_shards", 33, "email.send_shards: Input should be less than or equal to 32"),
        ("email.from", "Acme", "email.from: 'Acme' is not an email address like"),
        ("email.from", "hello@acme", "email.from: 'hello@acme' is not an email address"),
        ("email.from", "Acme <hello@acme.test", "email.from: 'Acme <hello@acme.test' is not"),
        ("email.from", "a@b.c junk", "email.from: 'a@b.c junk' is not an email address"),
        ("email.from", "a@b.c, d@e.f", "email.from: 'a@b.c, d@e.f' is not an email address"),
        # Resend refuses each email with a bad reply-to; a relative link leads nowhere.
        (
            "email.reply_to",
            "support at acme.com",
            "email.reply_to: 'support at acme.com' is not an email address",
        ),
        ("email.reply_to", "Support <help@", "email.reply_to: 'Support <help@' is not an"),
        ("email.app_url", "app.realco.io", "email.app_url: 'app.realco.io' must be a URL like"),
        ("email.app_url", "/dashboard", "email.app_url: '/dashboard' must be a URL like"),
        ("loops.0.unknown_key", 1, "loops.0.unknown_key: Extra inputs are not permitted"),
        (
            "database.tables.subscriptions",
            {"stripe": [{"customer": "email"}]},
            "database.tables.subscriptions: stripe: give its keys (customer, schema)",
        ),
        # PostgreSQL takes timeouts up to 2^31 - 1 milliseconds; timedelta, to a billion days.
        (
            "database.statement_timeout",
            "25d",
            "database.statement_timeout: '25d' is longer than PostgreSQL's longest",
        ),
        (
            "database.statement_timeout",
            "99999999999d",
            "database.statement_timeout: '99999999999d' is longer than any duration",
        ),
        ("start_date", "yesterday", "start_date: Input should be a valid date"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(document, path, value, expected):
    with pytest.raises(ConfigError) as raised:
        parse_config(_mutated(document, path, value), environ={})
    message = str(raised.value)
    assert "\n" not in message
    assert expected in message


@pytest.mark.parametrize(
    "address", ["Acme <hello@acme.test>", "hello@acme.test", "a@b.c", '"Acme, Inc." <a@b.c>']
)
def test_a_sender_address_with_or_without_a_name_is_accepted(document, address):
    config = parse_config(_mutated(document, "email.from", address), environ={})
    assert config.email.from_address == address


def test_missing_environment_variable_names_key_and_variable(document):
    document["email"]["unsubscribe_secret"] = "${SECRET_NOT_SET}"
    with pytest.raises(
        ConfigError,
        match=r"email.unsubscribe_secret: environment variable SECRET_NOT_SET is not set",
    ):
        parse_config(document, environ={})


def test_keep_days_must_cover_the_longest_outcome_window(document):
    """Outcomes are rewritten as far back as the longest window reaches, reading the snapshot
    of each window's last day: a day dropped sooner would lose its revenue."""
    document["loops"][0]["windows"] = ["7d", "30d", "90d"]
    document["database"]["keep_days"] = 94
    with pytest.raises(ConfigError) as refused:
        parse_config(document, environ={})
    assert str(refused.value).endswith(
        "database.keep_days: 94 days of snapshots are fewer than loops.0.windows reach back "
        "(90 days, and 5 for late sends): keep at least 95, or shorten the windows"
    )
    document["database"]["keep_days"] = 95
    assert parse_config(document, environ={}).database.keep_days == 95


def test_loops_must_share_one_timezone(document):
    second = copy.deepcopy(document["loops"][0])
    second["name"] = "second"
    second["steps"][0]["trigger"]["timezone"] = "Europe/Berlin"
    document["loops"].append(second)
    with pytest.raises(ConfigError, match="loops.1.steps.0.trigger.timezone: all loops share"):
        parse_config(document, environ={})


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loops: [\n  - name: x\n   bad")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_yes_no_on_and_off_are_words_not_booleans(document, tmp_path: Path):
    document["database"]["tables"]["users"]["exclude"] = [
        {"column": "status", "in": ["ON_HOLD", "OFF"]},
        {"column": "opted_in", "equals": "no"},
        {"column": "raw_app_meta_data.is_anonymous", "equals": True},
    ]
    document["loops"][0]["adjust"] = "no"
    # Written unquoted, as a user would: YAML 1.1 reads OFF, no and on as booleans.
    text = yaml.safe_dump(document).replace("'OFF'", "OFF").replace("'no'", "no")
    assert "- OFF" in text and "equals: no" in text and "adjust: no" in text
    path = tmp_path / "retention.yaml"
    path.write_text(text)
    config = load_config(path, environ={})
    exclusions = config.database.tables.users.exclude
    assert [exclusion.in_ or exclusion.equals for exclusion in exclusions] == [
        ["ON_HOLD", "OFF"],
        "no",
        True,
    ]
    assert config.loops[0].adjust is False  # a flag still takes no


@pytest.mark.parametrize(("delay", "days"), [("0d", 0), (0, 0), ("0s", 0), ("3d", 3), ("72h", 3)])
def test_step_delays_are_whole_days(document, delay, days):
    document["loops"][0]["steps"][1]["delay"] = delay
    document["loops"][0]["steps"][0]["delay"] = 0
    if days == 0:
        with pytest.raises(ConfigError, match=r"steps.1.delay: each step comes after"):
            parse_config(document, environ={})
        return
    assert parse_config(document, environ={}).loops[0].steps[1].delay_days == days


def test_a_step_delay_of_part_of_a_day_is_refused(document):
    document["loops"][0]["steps"][1]["delay"] = "36h"
    with pytest.raises(ConfigError, match=r"steps.1.delay: '36h' must be a whole number of days"):
        parse_config(document, environ={})


@pytest.mark.parametrize("cron", ["*/10 * * * *", "0 9,17 * * *", "0 8-18 * * 1-5", "@hourly"])
def test_a_cron_that_fires_more_than_once_a_day_is_refused(document, cron):
    with pytest.raises(ConfigError) as raised:
        parse_config(_mutated(document, "loops.0.steps.0.trigger.cron", cron), environ={})
    assert str(raised.value) == (
        f"configuration: loops.0.steps.0.trigger.cron: {cron!r} fires more than once a day, and "
        "every run of a day serves the same partition (the day just ended): give one minute and "
        "one hour, like '0 9 * * *'"
    )


@pytest.mark.parametrize(
    "cron",
    ["30 6 * * *", "0 9 * * 1", "0 09 1,15 * *", "0 9 */2 * *", "0 9 ? JAN mon-fri", "@daily"],
)
def test_a_cron_that_fires_at_most_once_a_day_is_accepted_and_dagster_schedules_it(document, cron):
    config = parse_config(_mutated(document, "loops.0.steps.0.trigger.cron", cron), environ={})
    assert config.loops[0].trigger.cron == cron
    job = dg.define_asset_job("any_job")
    assert dg.ScheduleDefinition(job=job, cron_schedule=cron).cron_schedule == cron


@pytest.mark.parametrize(
    "cron",
    [
        "30 6 * * *",
        "0 9 * * 1",
        "0 09 1,15 * *",
        "0 9 */2 * *",
        "0 9 ? JAN mon-fri",
        "0 9 1,15 * 1-5",
        "0 9 5/10 * *",
        "0 9 * * 7",
        "0 9 ? * sun,wed",
        "0 9 * * sat-sun",
        "0 9 * * fri-mon",
        "0 9 * * 1/2",
        "0 9 * * 5-7",
        "0 9 * * 1-7",
        "0 9 * nov-feb *",
        "0 9 25-5 * *",
        "@daily",
        "@weekly",
        "@monthly",
        "@yearly",
    ],
)
def test_the_days_and_time_a_cron_fires_on_are_the_ones_dagster_schedules(cron):
    """The daily schedules pick the loops due on a day by `fires_on`; Dagster fires them."""
    from datetime import date, datetime, timedelta
    from zoneinfo import ZoneInfo

    from dagster._utils.schedules import cron_string_iterator

    from retention_pipeline.config.cron import fires_on, time_of_day

    start = datetime(2026, 1, 1, tzinfo=ZoneInfo("Europe/Berlin"))
    fired = []
    for tick in cron_string_iterator(start.timestamp(), cron, "Europe/Berlin"):
        if tick.year > 2026:
            break
        fired.append(tick)
    days = [date(2026, 1, 1) + timedelta(days=n) for n in range(365)]
    assert [day for day in days if fires_on(cron, day)] == [tick.date() for tick in fired]
    assert {(tick.hour, tick.minute) for tick in fired} == {time_of_day(cron)}


@pytest.mark.parametrize(
    "cron",
    [
        "0 25 * * *",
        "60 9 * * *",
        "0 9 0 * *",
        "0 9 * 13 *",
        "0 9 * * 8",
        "0 9 30 2 *",
        "0 9 * *",
        "0 9 L * *",
        "0 9 * * funday",
        "0 9 */0 * *",
        "@reboot",
    ],
)
def test_an_invalid_cron_is_refused_in_one_line(document, cron):
    with pytest.raises(ConfigError) as raised:
        parse_config(_mutated(document, "loops.0.steps.0.trigger.cron", cron), environ={})
    assert str(raised.value) == (
        f"configuration: loops.0.steps.0.trigger.cron: {cron!r} is not a valid cron expression"
    )


def test_the_partitions_start_at_the_configured_start_date(document):
    from datetime import date

    assert load_config(SHIPPED, environ={}).start_date == date(2026, 8, 1)
    config = parse_config({**document, "start_date": "2026-10-01"}, environ={})
    assert config.start_date == date(2026, 10, 1)


def test_loops_may_each_have_their_own_cron_and_recovery(document):
    second = copy.deepcopy(document["loops"][0])
    second["name"] = "second"
    second["steps"][0]["trigger"]["cron"] = "30 15 * * 1-5"
    second["recovery"] = {"retries": 0}
    document["loops"].append(second)
    config = parse_config(document, environ={})
    assert [loop.trigger.cron for loop in config.loops] == ["0 9 * * *", "30 15 * * 1-5"]
    assert [loop.recovery.retries for loop in config.loops] == [3, 0]


def test_a_step_provider_must_be_email_provider_or_left_out(document):
    # The shipped file keeps the seed's `provider: resend` on every step: valid with resend.
    assert {s.action.provider for s in load_config(SHIPPED, environ={}).loops[0].steps} == {
        "resend"
    }
    outbox = _mutated(document, "email.provider", "outbox")
    with pytest.raises(ConfigError) as raised:
        parse_config(outbox, environ={})
    assert str(raised.value) == (
        "configuration: (top level): loops.0.steps.0.action.provider: 'resend' is not "
        "email.provider ('outbox'): every email goes where email.provider says; leave the step's "
        "provider out or make them equal"
    )
    for step in outbox["loops"][0]["steps"]:
        del step["action"]["provider"]
    assert parse_config(outbox, environ={}).loops[0].steps[1].action.provider is None


def test_the_loops_opinion_describes_its_send_job_in_the_ui(document):
    from retention_pipeline.defs.partitions import daily_partitions
    from retention_pipeline.defs.sending import build_send_job

    config = parse_config(_mutated(document, "loops.0.opinion", "Win back idle teams."), {})
    description = build_send_job(config.loops[0], daily_partitions(config), shards=1).description
    assert description.startswith("Win back idle teams. Send the re_engagement loop's emails")


SHIPPED_EMAIL_PROBLEMS = [
    "email.from: acme.test is under the reserved domain .test, which reaches no reader: give "
    "your own",
    "email.product_name: 'Acme' is the demo's placeholder: give your own (named in every "
    "subject and email)",
    "email.app_url: app.acme.test is under the reserved domain .test, which reaches no reader: "
    "give your own",
    "email.company_address: required outside the demo (the postal address in every email's footer)",
    "email.unsubscribe_url: app.acme.test is under the reserved domain .test, which reaches no "
    "reader: give your own",
]
OWN_EMAIL_SETTINGS = {
    "from": "Northwind <hello@northwind-notes.com>",
    "product_name": "Northwind",
    "app_url": "https://app.northwind-notes.com",
    "company_address": "Northwind Notes Ltd., 12 Harbour Road, Leith",
    "unsubscribe_url": "https://mail.northwind-notes.com/unsubscribe",
}


def test_the_demos_email_placeholders_are_named_one_line_each(document):
    """Outside the demo (`check` and every send run ask), the shipped file's email settings are
    the demo's placeholders, and a file that leaves them out has the demo's defaults."""
    assert parse_config(document, environ={}).email.placeholder_problems() == (
        SHIPPED_EMAIL_PROBLEMS
    )
    bare = {key: value for key, value in document.items() if key != "email"}
    assert parse_config(bare, environ={}).email.placeholder_problems() == [
        "email.from: required outside the demo (the sender of every email)",
        "email.product_name: required outside the demo (named in every subject and email)",
        "email.app_url: required outside the demo (where every email's button leads)",
        "email.company_address: required outside the demo (the postal address in every email's "
        "footer)",
        "email.unsubscribe_url: required outside the demo (where `retention-pipeline serve` "
        "answers unsubscribes)",
    ]
    own = {**document, "email": OWN_EMAIL_SETTINGS}
    assert parse_config(own, environ={}).email.placeholder_problems() == []


def test_replacing_only_the_domains_still_names_the_demos_product_and_address(document):
    """The shipped file with its own domains used to pass `check` and send emails naming Acme."""
    domains_only = {
        **document,
        "email": {
            **document["email"],
            "from": OWN_EMAIL_SETTINGS["from"],
            "app_url": OWN_EMAIL_SETTINGS["app_url"],
            "unsubscribe_url": OWN_EMAIL_SETTINGS["unsubscribe_url"],
            "company_address": "Acme Inc., 1 Example Street, Springfield",
        },
    }
    assert parse_config(domains_only, environ={}).email.placeholder_problems() == [
        "email.product_name: 'Acme' is the demo's placeholder: give your own (named in every "
        "subject and email)",
        "email.company_address: 'Acme Inc., 1 Example Street, Springfield' is the demo's "
        "placeholder: give your own (the postal address in every email's footer)",
    ]


@pytest.mark.parametrize("key", ["product_name", "app_url", "company_address"])
@pytest.mark.parametrize("blank", ["", "   "])
def test_a_blank_reader_facing_setting_is_required_outside_the_demo(document, key, blank):
    own = {**document, "email": {**OWN_EMAIL_SETTINGS, key: blank}}
    (problem,) = parse_config(own, environ={}).email.placeholder_problems()
    assert problem.startswith(f"email.{key}: required outside the demo (")


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("product_name", "Acme", "'Acme' is the demo's placeholder"),
        ("product_name", " ACME ", "'ACME' is the demo's placeholder"),
        (
            "company_address",
            "Acme Inc., 1 Example Street, Springfield",
            "'Acme Inc., 1 Example Street, Springfield' is the demo's placeholder",
        ),
        ("app_url", "https://app.acme.test", "app.acme.test is under the reserved domain .test"),
        ("from", "Acme <hello@acme.test>", "acme.test is under the reserved domain .test"),
    ],
)
def test_the_demos_own_value_written_out_is_refused_naming_its_key(document, key, value, said):
    own = {**document, "email": {**OWN_EMAIL_SETTINGS, key: value}}
    (problem,) = parse_config(own, environ={}).email.placeholder_problems()
    assert problem.startswith(f"email.{key}: {said}")


@pytest.mark.parametrize(
    ("key", "value", "host"),
    [
        ("app_url", "https://www.example.com/app", "www.example.com"),
        ("app_url", "https://example.org", "example.org"),
        ("app_url", "https://app.example.net", "app.example.net"),
        ("app_url", "http://localhost:3000", "localhost"),
        ("app_url", "https://shop.example", "shop.example"),
        ("unsubscribe_url", "https://links.acme.invalid/u", "links.acme.invalid"),
        ("unsubscribe_url", "http://127.0.0.1:8025/unsubscribe", "127.0.0.1"),
        ("unsubscribe_url", "https://10.0.0.7/unsubscribe", "10.0.0.7"),
        ("from", "Acme <hello@acme.test>", "acme.test"),
        ("reply_to", "support@Example.COM", "Example.COM"),
    ],
)
def test_each_placeholder_domain_is_refused_naming_its_key(document, key, value, host):
    own = {**document, "email": {**OWN_EMAIL_SETTINGS, key: value}}
    (problem,) = parse_config(own, environ={}).email.placeholder_problems()
    assert problem.startswith(f"email.{key}: {host} is ")
    assert problem.endswith(", which reaches no reader: give your own")


@pytest.mark.parametrize(
    "app_url", ["https://examples.com", "https://example.company.io", "https://testing.dev"]
)
def test_a_real_domain_that_merely_looks_like_one_is_accepted(document, app_url):
    own = {**document, "email": {**OWN_EMAIL_SETTINGS, "app_url": app_url}}
    assert parse_config(own, environ={}).email.placeholder_problems() == []


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_reply_to_is_none(document, blank):
    """The shipped pattern `${REPLY_TO:-}` left unset."""
    assert (
        parse_config(_mutated(document, "email.reply_to", blank), environ={}).email.reply_to is None
    )
