"""The loop configuration: what `retention.yaml` may say, validated with pydantic.

A loop says what the original `skene.config.ts` said: a schedule trigger, a condition (a built-in
segment or a SQL query with a timeout), an email action and a recovery policy.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import date, timedelta
from email.utils import parseaddr
from typing import Annotated, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from retention_pipeline.config.cron import fires_at_most_once_a_day, is_valid_cron
from retention_pipeline.recipients.addresses import EMAIL_ADDRESS_PATTERN

IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
DURATION_PATTERN = re.compile(r"^(\d+)(ms|s|m|h|d)$")
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

SEGMENTS = (
    "new",
    "active",
    "at_risk",
    "dormant",
    "resurrected",
    "never_activated",
    "churned",
)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_duration(value: str | int | float, *, allow_zero: bool = False) -> timedelta:
    """Turn `10m`, `30s`, `2h`, `500ms` (or a number of seconds) into a timedelta; zero only
    where `allow_zero` says it means something (a step sent the day its episode starts)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = DURATION_PATTERN.match(str(value).strip())
        if not match:
            raise ValueError(f"{value!r} is not a duration like 30s, 10m, 2h or 1d")
        seconds = int(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{value!r} must be a positive duration")
    return timedelta(seconds=seconds)


Duration = Annotated[str | int, Field(description="30s, 10m, 2h, 1d or seconds")]


def _check_identifier(value: str) -> str:
    if not IDENTIFIER_PATTERN.match(value):
        raise ValueError(
            f"{value!r} is not a valid SQL identifier (letters, digits, _ and $, "
            "at most 63 characters, not starting with a digit)"
        )
    return value


Identifier = Annotated[str, Field(min_length=1, max_length=63)]


class TableMapping(StrictModel):
    """Where one of the app's tables lives and what its columns are called."""

    table: Identifier
    schema_: Identifier = Field("public", alias="schema")
    columns: dict[str, Identifier]

    @field_validator("table", "schema_")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return _check_identifier(value)

    @field_validator("columns")
    @classmethod
    def _column_identifiers(cls, value: dict[str, str]) -> dict[str, str]:
        for column in value.values():
            _check_identifier(column)
        return value

    @property
    def qualified_name(self) -> str:
        return f"{self.schema_}.{self.table}"


def _table(table: str, **columns: str) -> TableMapping:
    return TableMapping(table=table, columns=columns)


# The logical columns the pipeline reads from each app table: a mapping must name the required
# ones and may leave the optional ones out (the app has no such column).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("id", "email", "created_at"),
    "events": ("user_id", "name", "created_at"),
    "sessions": ("user_id", "created_at"),
    "subscriptions": ("user_id", "status", "plan", "amount_cents"),
}
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("name", "timezone"),
    "events": ("properties",),
    "sessions": (),
    "subscriptions": ("updated_at", "currency", "billing_interval"),
}


class AppTables(StrictModel):
    """The app's tables, read and never written. Defaults follow a typical NestJS schema."""

    users: TableMapping = _table(
        "users", id="id", email="email", name="name", timezone="timezone", created_at="created_at"
    )
    events: TableMapping = _table(
        "events", user_id="user_id", name="name", properties="properties", created_at="created_at"
    )
    sessions: TableMapping = _table("sessions", user_id="user_id", created_at="created_at")
    subscriptions: TableMapping = _table(
        "subscriptions",
        user_id="user_id",
        status="status",
        plan="plan",
        amount_cents="amount_cents",
        billing_interval="billing_interval",
        currency="currency",
        updated_at="updated_at",
    )

    @model_validator(mode="after")
    def _known_columns(self) -> AppTables:
        for name in REQUIRED_COLUMNS:
            mapping: TableMapping = getattr(self, name)
            known = set(REQUIRED_COLUMNS[name]) | set(OPTIONAL_COLUMNS[name])
            unknown = sorted(set(mapping.columns) - known)
            if unknown:
                raise ValueError(
                    f"{name}.columns: unknown column key {unknown[0]!r} "
                    f"(known: {', '.join(sorted(known))})"
                )
            missing = [key for key in REQUIRED_COLUMNS[name] if key not in mapping.columns]
            if missing:
                raise ValueError(f"{name}.columns: missing required column key {missing[0]!r}")
        return self

    def items(self) -> list[tuple[str, TableMapping]]:
        return [(name, getattr(self, name)) for name in REQUIRED_COLUMNS]


class DatabaseSettings(StrictModel):
    url: str | None = Field(
        None,
        description="SQLAlchemy URL of the app database; required, except for the demo "
        "(`retention-pipeline dev`, `demo` and `--demo`), which runs on the embedded server",
    )
    read_url: str | None = Field(
        None,
        description="SQLAlchemy URL of a read replica of the app database: the daily snapshot "
        "reads the app's users and subscriptions there; the capture, the rollup and the "
        "pipeline's own tables stay on `url`",
    )
    schema_: Identifier = Field("retention", alias="schema")
    statement_timeout: Duration = "10m"
    tracking: Literal["triggers", "incremental"] = "triggers"
    tables: AppTables = AppTables()
    keep_days: int = Field(
        400,
        ge=35,
        description="days of snapshots and segments kept before the day being built; older "
        "daily partitions are dropped (the send log, suppressions and outcomes are kept)",
    )

    @field_validator("schema_")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return _check_identifier(value)

    @field_validator("statement_timeout")
    @classmethod
    def _duration(cls, value: str | int) -> str | int:
        parse_duration(value)
        return value

    @field_validator("url", "read_url")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None


# Names that never reach a reader: the top-level and second-level domains RFC 2606 and RFC 6761
# reserve for tests, examples and loopback. The demo's email settings use them (`acme.test`);
# outside the demo `check` and every send run refuse them.
PLACEHOLDER_DOMAINS = (
    "test",
    "example",
    "invalid",
    "localhost",
    "example.com",
    "example.net",
    "example.org",
)


def placeholder_domain(host: str) -> str | None:
    """Why `host` reaches no reader (it is under a reserved domain, `acme.test` under `.test`, or
    a loopback or private IP address), or None for a real domain."""
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        for domain in PLACEHOLDER_DOMAINS:
            if host == domain or host.endswith(f".{domain}"):
                return f"under the reserved domain .{domain}"
        return None
    return "a loopback or private address" if address.is_private else None


# The email settings every email shows its reader, and what each is for. The demo's values
# (`DEMO_EMAIL`) are their defaults; outside the demo each must be given, and be neither blank
# nor the demo's.
READER_FACING_SETTINGS = {
    "from_address": ("from", "the sender of every email"),
    "product_name": ("product_name", "named in every subject and email"),
    "app_url": ("app_url", "where every email's button leads"),
    "company_address": ("company_address", "the postal address in every email's footer"),
    "unsubscribe_url": ("unsubscribe_url", "where `retention-pipeline serve` answers unsubscribes"),
}
DEMO_EMAIL = {
    "from_address": "Acme <hello@acme.test>",
    "product_name": "Acme",
    "app_url": "https://app.acme.test",
    "company_address": "Acme Inc., 1 Example Street, Springfield",
    "unsubscribe_url": "https://app.acme.test/unsubscribe",
}


class EmailSettings(StrictModel):
    provider: Literal["resend", "outbox"] = "resend"
    frequency_cap_days: int = Field(
        3, ge=0, description="at most one email per this many days, across loops"
    )
    from_address: str = Field(DEMO_EMAIL["from_address"], alias="from")
    reply_to: str | None = None
    outbox_dir: str | None = Field(None, description="default: outbox/ under $RETENTION_HOME")
    requests_per_second: float = Field(2.0, gt=0)
    send_shards: int = Field(
        1,
        ge=1,
        le=32,
        description="send runs per loop and day, each for its own users, sending together at "
        "requests_per_second in total (every shard is a partition of every day: a handful "
        "is plenty)",
    )
    product_name: str = DEMO_EMAIL["product_name"]
    app_url: str = DEMO_EMAIL["app_url"]
    company_address: str = DEMO_EMAIL["company_address"]
    unsubscribe_url: str = DEMO_EMAIL["unsubscribe_url"]
    unsubscribe_secret: str | None = None
    webhook_secret: str | None = None

    @field_validator("from_address")
    @classmethod
    def _an_address(cls, value: str) -> str:
        # parseaddr never fails: it drops an unclosed "<" and glues trailing words onto the
        # address, so the address must also be the whole value or its "<...>" part.
        _name, address = parseaddr(value)
        whole = value.strip()
        if not (
            EMAIL_ADDRESS_PATTERN.fullmatch(address)
            and (whole == address or whole.endswith(f"<{address}>"))
        ):
            raise ValueError(
                f"{value!r} is not an email address like 'Acme <hello@acme.test>' or "
                "'hello@acme.test'"
            )
        return value

    @field_validator("unsubscribe_url")
    @classmethod
    def _one_click_url(cls, value: str) -> str:
        # RFC 8058: one-click unsubscribe URLs are https; plain http only for a local test.
        parsed = urlsplit(value)
        local = parsed.scheme == "http" and parsed.hostname in ("localhost", "127.0.0.1")
        if not (parsed.scheme == "https" and parsed.hostname) and not local:
            raise ValueError(f"{value!r} must be an https:// URL (RFC 8058)")
        return value

    @field_validator("unsubscribe_secret", "webhook_secret")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    def placeholder_problems(self) -> list[str]:
        """Why these settings may not email real people, one line per key: a reader-facing key
        left out or blank, or written out as the demo's own value (`DEMO_EMAIL`), or an address
        or URL on a placeholder domain (`PLACEHOLDER_DOMAINS`)."""
        problems = []
        for field, (key, purpose) in READER_FACING_SETTINGS.items():
            value = getattr(self, field)
            host = _host(key, value)
            if field not in self.model_fields_set or not value.strip():
                problems.append(f"email.{key}: required outside the demo ({purpose})")
            elif host and (reason := placeholder_domain(host)):
                problems.append(_unreachable(key, host, reason))
            elif value.strip().casefold() == DEMO_EMAIL[field].casefold():
                problems.append(
                    f"email.{key}: {value.strip()!r} is the demo's placeholder: give your own "
                    f"({purpose})"
                )
        reply_host = _host("reply_to", self.reply_to or "")
        if reply_host and (reason := placeholder_domain(reply_host)):
            problems.append(_unreachable("reply_to", reply_host, reason))
        return problems


def _host(key: str, value: str) -> str:
    """The domain (or IP address) an address or URL setting points at; empty for the others."""
    if key in ("from", "reply_to"):
        return parseaddr(value)[1].rpartition("@")[2]
    if key in ("app_url", "unsubscribe_url"):
        return urlsplit(value.strip()).hostname or ""
    return ""


def _unreachable(key: str, host: str, reason: str) -> str:
    return f"email.{key}: {host} is {reason}, which reaches no reader: give your own"


class ScheduleTrigger(StrictModel):
    type: Literal["schedule"] = "schedule"
    cron: str = "0 9 * * *"
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not is_valid_cron(value):
            raise ValueError(f"{value!r} is not a valid cron expression")
        if not fires_at_most_once_a_day(value):
            raise ValueError(
                f"{value!r} fires more than once a day, and every run of a day serves the same "
                "partition (the day just ended): give one minute and one hour, like '0 9 * * *'"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a known IANA timezone") from None
        return value


class SegmentCondition(StrictModel):
    type: Literal["segment"] = "segment"
    segment: Literal[SEGMENTS] = "dormant"  # type: ignore[valid-type]


class TimedQuery(StrictModel):
    """A SQL query the pipeline runs read-only, under its own timeout."""

    query: str = Field(min_length=1)
    timeout: Duration = "10m"

    @field_validator("timeout")
    @classmethod
    def _duration(cls, value: str | int) -> str | int:
        parse_duration(value)
        return value


class QueryCondition(TimedQuery):
    type: Literal["query"] = "query"


Condition = Annotated[SegmentCondition | QueryCondition, Field(discriminator="type")]


class ActivitySuccess(StrictModel):
    """A user came back: any product event or auth session."""

    type: Literal["activity"] = "activity"


class EventSuccess(StrictModel):
    """A user came back: one of these named product events."""

    type: Literal["events"] = "events"
    events: list[str] = Field(min_length=1)


class QuerySuccess(TimedQuery):
    """A user came back: a row of this query, which returns `user_id` and `at` (when)."""

    type: Literal["query"] = "query"


Success = Annotated[ActivitySuccess | EventSuccess | QuerySuccess, Field(discriminator="type")]

# Each shipped template and the variants it has copy of (its subject says which): a variant
# named here has words of its own, any other would silently get the first one's.
TEMPLATE_VARIANTS: dict[str, tuple[str, ...]] = {
    "re_engagement": ("a", "b"),
    "re_engagement_follow_up": ("a", "b"),
    "re_engagement_last_call": ("a", "b"),
}
KNOWN_TEMPLATES = tuple(TEMPLATE_VARIANTS)
# What `{{user.FIELD}}` may name in a step's personalization, as the seed writes it.
USER_FIELDS = ("id", "email", "name", "timezone", "last_activity_at")
USER_FIELD_REFERENCE = re.compile(r"^\s*\{\{\s*user\.([A-Za-z_]\w*)\s*\}\}\s*$")


class EmailAction(StrictModel):
    type: Literal["email"] = "email"
    provider: Literal["resend", "outbox"] | None = Field(
        None,
        description="the seed's per-step provider: every email goes where email.provider says, "
        "so it must be that one when given",
    )
    template: str = "re_engagement"
    personalization: dict[str, str] = Field(default_factory=dict)
    variants: list[Identifier] = Field(default_factory=lambda: ["a"], min_length=1)

    @field_validator("personalization")
    @classmethod
    def _user_fields(cls, value: dict[str, str]) -> dict[str, str]:
        for name, reference in value.items():
            match = USER_FIELD_REFERENCE.match(reference)
            if match and match.group(1) not in USER_FIELDS:
                raise ValueError(
                    f"{name}: unknown user field {match.group(1)!r} "
                    f"(known: {', '.join(USER_FIELDS)})"
                )
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        if value not in KNOWN_TEMPLATES:
            raise ValueError(f"unknown template {value!r} (known: {', '.join(KNOWN_TEMPLATES)})")
        return value

    @field_validator("variants")
    @classmethod
    def _variants_have_copy(cls, value: list[str], info: ValidationInfo) -> list[str]:
        template = info.data.get("template")  # absent when the template itself was refused
        if template is None:
            return value
        known = TEMPLATE_VARIANTS[template]
        for variant in value:
            if variant not in known:
                raise ValueError(
                    f"variant {variant!r} has no copy in template {template!r}, which would "
                    f"send it variant {known[0]!r}'s words (its variants: {', '.join(known)})"
                )
        if len(set(value)) < len(value):
            raise ValueError(f"each variant once ({', '.join(value)})")
        return value


class Step(StrictModel):
    """One email of a loop's sequence. Only the first step has a trigger and a condition: the
    condition starts an episode, and later steps follow it `delay` after it started."""

    trigger: ScheduleTrigger | None = None
    condition: Condition | None = None
    delay: Duration = "0d"
    action: EmailAction = EmailAction()

    @field_validator("delay")
    @classmethod
    def _whole_days(cls, value: str | int) -> str | int:
        if parse_duration(value, allow_zero=True).total_seconds() % 86400:
            raise ValueError(f"{value!r} must be a whole number of days, like 3d")
        return value

    @property
    def delay_days(self) -> int:
        return int(parse_duration(self.delay, allow_zero=True).total_seconds() // 86400)


class Holdout(StrictModel):
    fraction: float = Field(0.1, ge=0, lt=1)
    salt: str | None = Field(None, description="default: the loop's name")


class Recovery(StrictModel):
    retries: int = Field(3, ge=0, le=20)
    backoff: Literal["exponential", "linear", "none"] = "exponential"
    delay: Duration = "30s"


class SegmentRules(StrictModel):
    """Thresholds of the engagement segments; every loop may set its own."""

    dormant_after_days: int = Field(7, ge=1)
    dormant_session_drop: float = Field(0.8, gt=0, le=1)
    at_risk_session_drop: float = Field(0.5, gt=0, le=1)
    minimum_baseline_sessions_per_week: float = Field(3, ge=0)
    new_user_days: int = Field(7, ge=0)
    never_activated_after_days: int = Field(7, ge=0)
    churned_after_days: int = Field(30, ge=1)
    dormant_jump_warning_factor: float = Field(3.0, gt=1)

    @model_validator(mode="after")
    def _ordered(self) -> SegmentRules:
        if self.at_risk_session_drop >= self.dormant_session_drop:
            raise ValueError(
                "at_risk_session_drop must be smaller than dormant_session_drop "
                f"({self.at_risk_session_drop} >= {self.dormant_session_drop})"
            )
        return self


class Loop(StrictModel):
    name: Identifier
    type: Literal["retention"] = "retention"
    opinion: str = Field(
        "", description="what the loop is for, in a sentence: its send job's description in the UI"
    )
    steps: list[Step] = Field(min_length=1)
    segments: SegmentRules = SegmentRules()
    holdout: Holdout = Holdout()
    step_holdout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="the share of treated users due a later step (the second on) who are "
        "withheld that step only, by a draw of its own: the step's lift compares its recipients "
        "with them; 0: later steps are not measured, nor paused",
    )
    cooldown_days: int = Field(30, ge=0, description="before a returned user may re-enter")
    recovery: Recovery = Recovery()
    success: Success = ActivitySuccess()
    windows: list[Duration] = Field(
        default_factory=lambda: ["7d", "14d", "30d"],
        min_length=1,
        description="how long after an assignment a return counts; the first one decides",
    )
    adjust: bool = Field(
        True, description="share traffic between variants by results and pause harmful steps"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_identifier(value)

    @property
    def trigger(self) -> ScheduleTrigger:
        return self.steps[0].trigger or ScheduleTrigger()

    @property
    def condition(self) -> SegmentCondition | QueryCondition:
        return self.steps[0].condition or SegmentCondition()

    @property
    def holdout_salt(self) -> str:
        return self.holdout.salt or self.name

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str | int]) -> list[str | int]:
        days = []
        for window in value:
            seconds = parse_duration(window).total_seconds()
            if seconds % 86400:
                raise ValueError(f"{window!r} must be a whole number of days, like 7d")
            days.append(int(seconds // 86400))
        if days != sorted(set(days)):
            raise ValueError(f"windows must grow, each once ({', '.join(map(str, value))})")
        return value

    @property
    def window_days(self) -> list[int]:
        return [int(parse_duration(window).total_seconds() // 86400) for window in self.windows]

    @model_validator(mode="after")
    def _sequence(self) -> Loop:
        previous = -1
        templates: list[str] = []
        for index, step in enumerate(self.steps):
            if step.action.template in templates:
                raise ValueError(
                    f"steps.{index}.action.template: {step.action.template!r} is already step "
                    f"{templates.index(step.action.template)}'s; a step's template is its id in "
                    "the experiment design, so each step of a loop has its own"
                )
            templates.append(step.action.template)
            if index and (step.trigger is not None or step.condition is not None):
                raise ValueError(
                    f"steps.{index}: only the first step has a trigger and a condition; later "
                    "steps follow the episode it starts"
                )
            if step.delay_days <= previous:
                raise ValueError(
                    f"steps.{index}.delay: each step comes after the one before "
                    f"({step.delay_days} days <= {previous})"
                )
            previous = step.delay_days
        return self


# Visits are counted on 5-minute slots of the day, so the gap between two is whole slots.
VISIT_SLOT_MINUTES = 5
VISIT_GAP_MINUTES = (5, 240)


class ActivitySettings(StrictModel):
    """What the daily snapshot computes for every user."""

    baseline: Literal["visits", "logins"] | None = Field(
        None,
        description="what the session baseline and the drop rules count: `visits` (bursts of "
        "activity from any source, separated by `visit_gap`) or `logins` (the login sources' "
        "rows); default: logins when a login source is configured, else visits",
    )
    visit_gap: Duration = Field(
        "30m",
        description="the quiet time that ends a visit: a multiple of 5 minutes, 5m to 4h",
    )
    baseline_weeks: int = Field(4, ge=1, le=52)
    last_actions: int = Field(3, ge=1, le=20)

    @field_validator("visit_gap")
    @classmethod
    def _whole_slots(cls, value: str | int) -> str | int:
        minutes = parse_duration(value).total_seconds() / 60
        low, high = VISIT_GAP_MINUTES
        if minutes % VISIT_SLOT_MINUTES or not low <= minutes <= high:
            raise ValueError(
                f"{value!r} must be a multiple of {VISIT_SLOT_MINUTES} minutes from {low}m to "
                f"{high // 60}h, like 30m"
            )
        return value

    @property
    def visit_gap_minutes(self) -> int:
        return int(parse_duration(self.visit_gap).total_seconds() // 60)


class RetentionConfig(StrictModel):
    database: DatabaseSettings = DatabaseSettings()
    activity: ActivitySettings = ActivitySettings()
    email: EmailSettings = EmailSettings()
    loops: list[Loop] = Field(min_length=1)
    start_date: date | None = Field(
        None,
        description="the first daily partition: the first day snapshots and emails are made "
        "for; required by the Dagster definitions, except under `retention-pipeline dev`",
    )

    @model_validator(mode="after")
    def _loops_consistent(self) -> RetentionConfig:
        names = [loop.name for loop in self.loops]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"loops: duplicate loop name {duplicates[0]!r}")
        for index, loop in enumerate(self.loops):
            for number, step in enumerate(loop.steps):
                provider = step.action.provider
                if provider is not None and provider != self.email.provider:
                    raise ValueError(
                        f"loops.{index}.steps.{number}.action.provider: {provider!r} is not "
                        f"email.provider ({self.email.provider!r}): every email goes where "
                        "email.provider says; leave the step's provider out or make them equal"
                    )
        first = self.loops[0].trigger
        for index, loop in enumerate(self.loops):
            if loop.trigger.timezone != first.timezone:
                raise ValueError(
                    f"loops.{index}.steps.0.trigger.timezone: all loops share one timezone, "
                    f"because daily partitions and the activity rollup use it "
                    f"({first.timezone!r} vs {loop.trigger.timezone!r})"
                )
        return self

    @property
    def counted_use(self) -> Literal["visits", "logins"]:
        """What the session baseline and the drop rules count: `activity.baseline`, or by
        default logins when a login source is configured (the `sessions` table), else visits."""
        if self.activity.baseline is not None:
            return self.activity.baseline
        return "logins" if self.has_login_source else "visits"

    @property
    def has_login_source(self) -> bool:
        """Whether some configured source records logins: today the `sessions` table, which
        every mapping has."""
        return True

    @property
    def timezone(self) -> str:
        return self.loops[0].trigger.timezone

    def loop(self, name: str) -> Loop:
        for loop in self.loops:
            if loop.name == name:
                return loop
        known = ", ".join(loop.name for loop in self.loops)
        raise ValueError(f"no loop named {name!r} (known: {known})")
