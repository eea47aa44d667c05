"""Configuration: YAML in, validated pydantic models out, every error naming its path.

Loading does the file and environment I/O; the models themselves are plain data.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from relay import config_problems
from relay.errors import ConfigError
from relay.models import normalize_event_type
from relay.signatures import whsec_key
from relay.templates import check_template

# --- value types -----------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """`500ms`, `5s`, `10m`, `24h`, `7d` (or a bare number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 500ms, 5s, 10m or 24h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    # The value is not quoted back: a secret misplaced here must not be printed.
    raise ValueError("expected a duration like 500ms, 5s, 10m or 24h")


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A duration in seconds, written in the config as `500ms`, `5s`, `24h`..."""

PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
"""A duration that must be above zero: an interval or a timeout (0 would spin or hang)."""


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    # Relative paths follow the config file, not the working directory, so that the
    # same file behaves the same wherever `relay serve` is started from.
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sections --------------------------------------------------------------------------


class ServerConfig(_Model):
    # Loopback unless the operator says otherwise: a tokenless source must never face
    # the network by default.
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Bounds on what one request may cost (docs/operating.md, Limits). A hostile client meets
    # these first; each refusal is a 4xx or a 503 with the documented error body.
    max_body_bytes: int = Field(1_048_576, ge=1)
    max_records: int = Field(1000, ge=1)  # events in one POST
    max_json_depth: int = Field(32, ge=2, le=512)
    max_header_bytes: int = Field(8190, ge=1024)  # the request line and each header line
    read_timeout: PositiveDuration = 30.0  # for the whole body, however it trickles in
    keepalive_timeout: PositiveDuration = 75.0  # longer than most balancers' idle timeout
    # Hooks being answered at once; beyond it a fast 503 with Retry-After, not a queue.
    max_concurrent: int = Field(1000, ge=1)
    # Proxies whose forwarding header is believed for allow_ips (relay.forwarded), and
    # the one header they write: only that one is read.
    trusted_proxies: list[IPvAnyNetwork] = []
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    # Bound on how long shutdown waits for in-flight requests and deliveries.
    drain_timeout: Duration = 10.0
    # Reload when the config file changes (also `relay serve --watch`); SIGHUP always does.
    watch_config: bool = False
    watch_interval: PositiveDuration = 1.0
    # Worker processes answering HTTP on the port (SO_REUSEPORT), beside a leader that
    # stores what they receive and runs the sinks. 0: one process does everything.
    workers: int = Field(0, ge=0, le=64)

    @field_validator("host")
    @classmethod
    def _unbracketed(cls, value: str) -> str:
        # `[::1]` is how a URL writes an IPv6 address; a socket wants it bare.
        value = value.strip()
        return value[1:-1] if value.startswith("[") and value.endswith("]") else value


def _check_console_token(value: SecretStr) -> SecretStr:
    # Not quoted back: it is the console's credential.
    if len(value.get_secret_value()) < 16:
        raise ValueError("token must be at least 16 characters (try: openssl rand -hex 24)")
    return value


class _StoreBase(_Model):
    # Finished deliveries are kept this long (for inspection) before pruning.
    keep_done: Duration = 3600.0
    prune_interval: PositiveDuration = 60.0
    # /readyz fails below this much free space where the store lives (SQLite: the disk;
    # Redis: what `maxmemory` leaves): the sender is told to wait before a full store
    # makes every ingest a 503.
    min_free_bytes: int = Field(100 * 1024 * 1024, ge=0)
    # Unusable bodies from authenticated senders, newest kept within both bounds;
    # quarantine_max 0 keeps none.
    quarantine_max: int = Field(1000, ge=0)
    quarantine_max_bytes: int = Field(50 * 1024 * 1024, ge=0)


class SqliteStoreConfig(_StoreBase):
    """One file on a local disk: one relay (with its `server.workers`) per file."""

    backend: Literal["sqlite"] = "sqlite"
    path: ConfigPath = Field(Path("relay-data/relay.db"), validate_default=True)


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


# Options a Redis URL's query may carry (redis-py reads them); relay's own settings are
# keys of `store:`.
_REDIS_QUERY = frozenset(
    {"password", "db", "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"}
)
_ENCODE_PASSWORD = "percent-encode @ : / # ? in the password (%40 %3A %2F %23 %3F)"


def _check_redis_url(value: SecretStr) -> SecretStr:
    # Not quoted back: a Redis URL may carry its password.
    url = value.get_secret_value()
    if not url.startswith(_REDIS_SCHEMES):
        raise ValueError("url must start with redis://, rediss:// (TLS) or unix://")
    unix = url.startswith("unix://")
    if not unix:
        # An unencoded @ or # in a password moves the host into it: the URL would name
        # a part of the password as the host, in every message that shows the URL.
        authority = url.split("://", 1)[1].split("/", 1)[0]
        if authority.count("@") > 1 or "#" in url:
            raise ValueError(f"url is not a valid Redis URL: {_ENCODE_PASSWORD}")
    try:
        parsed = URL(url)
        valid = bool(parsed.path) if unix else bool(parsed.host)
        if valid and not unix:
            _ = parsed.port  # a port that is not a number raises here
    except (ValueError, UnicodeError):
        valid = False
    if not valid:
        raise ValueError(
            f"url is not a valid Redis URL: check its host and port, and {_ENCODE_PASSWORD}"
        )
    unknown = sorted(set(parsed.query) - _REDIS_QUERY)
    if unknown:
        raise ValueError(
            f"url has an unknown query option {unknown[0]!r} (a Redis URL may carry"
            f" {', '.join(sorted(_REDIS_QUERY))}; relay's settings are keys of store:)"
        )
    database = parsed.query.get("db") if unix else parsed.path.strip("/") or None
    if database is not None and not database.isdigit():
        raise ValueError("url names a database that is not a number (redis://host:6379/0)")
    return value


class RedisStoreConfig(_StoreBase):
    """A Redis (7.0 or newer) that several relays share: one dedupe, one set of queues."""

    backend: Literal["redis"]
    # redis://[:password@]host:port/db, rediss:// for TLS, unix:///path.sock. A secret:
    # it may carry the password, so it is never logged or shown whole.
    url: Annotated[SecretStr, AfterValidator(_check_redis_url)]
    # Every key starts with `{prefix}:`, one hash tag (Redis Cluster keeps them in one
    # slot); relays with different prefixes share a Redis without sharing anything else.
    prefix: str = Field("relay", min_length=1, max_length=64)
    # How long a relay's hold on a delivery it is sending lasts without being renewed
    # (its lanes renew it while the send runs): a relay killed mid-send holds its work
    # this long, after which another relay takes it over.
    lease: PositiveDuration = 30.0
    # A Redis Cluster: `url` names any node; the client follows the cluster's slots.
    # relay's keys share one hash tag, so one shard holds them all.
    cluster: bool = False
    # A Redis call slower than this fails: an ingest answers 503 and the sender retries.
    socket_timeout: PositiveDuration = 5.0
    connect_timeout: PositiveDuration = 5.0

    @field_validator("prefix")
    @classmethod
    def _one_hash_tag(cls, value: str) -> str:
        # The prefix is the keys' hash tag `{prefix}`: a brace would end it early.
        if any(c in value for c in "{}") or any(c.isspace() for c in value):
            raise ValueError("prefix must not contain braces or spaces")
        return value


STORE_BACKENDS = ("sqlite", "redis")


def _default_backend(value: object) -> object:
    # `store:` without `backend:` is SQLite, as it always was.
    if isinstance(value, dict) and "backend" not in value:
        return {**value, "backend": "sqlite"}
    return value


StoreConfig = Annotated[
    SqliteStoreConfig | RedisStoreConfig,
    BeforeValidator(_default_backend),
    Field(discriminator="backend"),
]


class DedupeConfig(_Model):
    window: PositiveDuration = 86400.0


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class RetryConfig(_Model):
    max_attempts: int = Field(10, ge=1)
    initial: PositiveDuration = 1.0
    max: Duration = 300.0
    # A delivery older than this is dead-lettered at its next failure (None: no bound).
    max_age: Duration | None = None

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> RetryConfig:
        if self.max < self.initial:
            raise ValueError("retry.max must not be smaller than retry.initial")
        return self


class CircuitConfig(_Model):
    """Stop sending to a sink that fails most of what it is sent (relay.circuit): when
    at least `failure_rate` of the sends within `window` failed, once `min_sends` were
    made, wait `cooldown`, then let one delivery probe; each failed probe doubles the
    wait, up to `max_cooldown`; a successful one closes the circuit."""

    enabled: bool = True
    failure_rate: float = Field(0.5, gt=0.0, le=1.0)
    window: PositiveDuration = 60.0
    min_sends: int = Field(50, ge=1)
    cooldown: PositiveDuration = 30.0
    # None: 10 minutes, or `cooldown` if that is longer.
    max_cooldown: PositiveDuration | None = None
    # This many consecutive failed sends open it too, whatever the rate: a dead sink
    # too quiet to make min_sends a window. relay 0.1 opened at 5, which a sink failing
    # one send in five reaches every few thousand sends; 10, every 12 million. None: off.
    failures: int | None = Field(10, ge=1)

    @model_validator(mode="after")
    def _max_not_below_first(self) -> CircuitConfig:
        if self.max_cooldown is not None and self.max_cooldown < self.cooldown:
            raise ValueError("circuit.max_cooldown must not be smaller than circuit.cooldown")
        return self

    @property
    def cooldown_cap(self) -> float:
        return self.max_cooldown if self.max_cooldown is not None else max(600.0, self.cooldown)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")


def parse_rate(value: object) -> float:
    """`10/s`, `600/m`, `1000/h` -> sends per second."""
    if isinstance(value, str):
        match = _RATE.match(value)
        if match and float(match.group(1)) > 0:
            return float(match.group(1)) / _UNIT_SECONDS[match.group(2)]
    raise ValueError("expected a rate like 10/s, 600/m or 1000/h")


Rate = Annotated[float, BeforeValidator(parse_rate)]
"""Sends per second, written as `10/s`, `600/m`, `1000/h`."""


def _check_whsec(value: SecretStr) -> SecretStr:
    whsec_key(value.get_secret_value())  # raises ValueError, worded for the config
    return value


WhsecSecret = Annotated[SecretStr, AfterValidator(_check_whsec)]

_EXTRACTOR = re.compile(r"^(header:[A-Za-z0-9!#$%&'*+.^_`|~-]+|\$?(\.?[A-Za-z0-9_-]+)+)$")


def _check_extractor(value: str | None) -> str | None:
    if value is not None and not _EXTRACTOR.match(value):
        raise ValueError("expected header:<Name> or a JSON path such as $.data.id or data.id")
    return value


Extractor = Annotated[str | None, AfterValidator(_check_extractor)]


class _SourceBase(_Model):
    allow_ips: list[IPvAnyNetwork] | None = None


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _check_header_name(value: str) -> str:
    if not _HEADER_NAME.match(value):
        raise ValueError("expected an HTTP header name (letters, digits and - . _ etc.)")
    return value


HeaderName = Annotated[str, AfterValidator(_check_header_name)]


def _token_not_empty(value: SecretStr) -> SecretStr:
    if not value.get_secret_value():
        raise ValueError(
            "token is empty (is its environment variable set?); an open source is"
            " written by leaving the key out"
        )
    return value


Token = Annotated[SecretStr, AfterValidator(_token_not_empty)]


class QingStorSourceConfig(_SourceBase):
    """QingStor does not sign its POSTs: a token in the URL is the secret it can carry."""

    kind: Literal["qingstor"]
    token: Token | None = None
    # `image` results have no documented shape: such a source keeps any JSON object.
    cloudfunc: Literal["notifier", "tupu-porn", "image"] | None = None

    @property
    def authenticates(self) -> bool:
        return self.token is not None


class GenericSourceBase(_SourceBase):
    # Where the event id comes from: `header:<Name>` or a JSON path into the body;
    # absent, the hash of the body's canonical JSON.
    id_from: Extractor = None
    # Where the envelope `type` comes from, likewise; absent, the body's string `type`
    # field if it has one, else the source kind.
    type_from: Extractor = None


class StandardWebhooksSourceConfig(GenericSourceBase):
    """Senders that sign per Standard Webhooks; dedupe on their `webhook-id`."""

    kind: Literal["standard-webhooks"]
    secrets: list[WhsecSecret] = Field(min_length=1)  # several while rotating
    tolerance: Duration = 300.0

    @property
    def authenticates(self) -> bool:
        return True  # every request is signed


class HmacCheck(_Model):
    """A hex or base64 HMAC of the raw body in one header, GitHub-style."""

    secrets: list[SecretStr] = Field(min_length=1)  # several while rotating
    header: str = "X-Hub-Signature-256"
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""  # e.g. "sha256=" for GitHub

    @field_validator("secrets")
    @classmethod
    def _not_empty(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(not v.get_secret_value() for v in value):
            raise ValueError("a secret is empty")
        return value


class HmacSourceConfig(GenericSourceBase, HmacCheck):
    kind: Literal["hmac"]

    @property
    def authenticates(self) -> bool:
        return True  # every request is signed


class BasicAuthConfig(_Model):
    username: str = Field(min_length=1)
    password: SecretStr


class GenericSourceConfig(GenericSourceBase):
    """Any JSON sender, authenticated by a token and/or HTTP basic auth."""

    kind: Literal["generic"]
    token: SecretStr | None = None
    basic_auth: BasicAuthConfig | None = None

    @property
    def authenticates(self) -> bool:
        return self.token is not None or self.basic_auth is not None


class S3SourceConfig(_SourceBase):
    """S3 event notifications pushed over HTTP: MinIO's webhook target, Ceph's HTTP
    topics. They sign nothing; MinIO sends its auth_token as `Authorization: Bearer`."""

    kind: Literal["s3"]
    # Taken from `Authorization: Bearer`, X-Relay-Token or ?token=.
    token: Token | None = None
    # How records carry object keys: `url` (AWS and MinIO: URL-encoded, `+` a space),
    # `raw` (Ceph), or `auto`: raw when the record's eventSource is ceph:s3, else url.
    key_encoding: Literal["auto", "url", "raw"] = "auto"

    @property
    def authenticates(self) -> bool:
        return self.token is not None


class CloudEventsSourceConfig(_SourceBase):
    """Any CloudEvents 1.0 producer over HTTP (structured, batched or binary mode)."""

    kind: Literal["cloudevents"]
    # Taken from `Authorization: Bearer`, X-Relay-Token, `token_header` or ?token=.
    token: Token | None = None
    # A header of the sender's choosing that carries the token: event buses let a
    # target add fixed headers (X-Api-Key), rarely a query string.
    token_header: HeaderName | None = None
    # An HMAC of the raw body the sender adds, checked as `kind: hmac` checks it.
    hmac: HmacCheck | None = None

    @model_validator(mode="after")
    def _token_header_needs_token(self) -> CloudEventsSourceConfig:
        if self.token_header is not None and self.token is None:
            raise ValueError("token_header names where the token comes; set token too")
        # A ce-* header is an attribute of the event in binary mode, kept with it.
        for key, header in (
            ("token_header", self.token_header),
            ("hmac.header", self.hmac and self.hmac.header),
        ):
            if header and header.lower().startswith("ce-"):
                raise ValueError(
                    f"{key}: a ce-* header is a CloudEvents attribute; choose another name"
                )
        return self

    @property
    def authenticates(self) -> bool:
        return self.token is not None or self.hmac is not None


class _SinkBase(_Model):
    retry: RetryConfig = RetryConfig()
    circuit: CircuitConfig = CircuitConfig()
    # Deliveries waiting on disk; at this many, ingest answers 503 for events bound here.
    max_queue: int = Field(100_000, ge=1)
    # per_key: the events of one object (source, bucket, key) reach this sink one at a
    # time, in their own order; different objects stay concurrent.
    order: Literal["none", "per_key"] = "none"
    # How long one event may hold up the later events of its object, from its first
    # failed attempt; then they go on without it (it keeps its retries).
    order_timeout: PositiveDuration = 300.0
    # Of several events waiting for one object, deliver only the newest (its state, not
    # its history); the others are settled as coalesced.
    coalesce: bool = False

    @model_validator(mode="after")
    def _coalesce_needs_order(self) -> _SinkBase:
        if self.coalesce and self.order != "per_key":
            raise ValueError("coalesce: true needs order: per_key")
        return self


class FileSinkConfig(_SinkBase):
    kind: Literal["file"]
    path: ConfigPath


def _check_http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("url must start with http:// or https://")
    try:
        # What the sink's client will make of it, checked now rather than at start.
        parsed = URL(value)
        valid = bool(parsed.host) and parsed.port is not None
    except (ValueError, UnicodeError):
        valid = False
    if not valid:
        # Not quoted back: the URL is a secret (robot and webhook URLs carry tokens).
        raise ValueError("url is not a valid http(s) URL (check its host and port)")
    return value


def _check_secret_url(value: SecretStr) -> SecretStr:
    _check_http_url(value.get_secret_value())
    return value


class SuccessConfig(_Model):
    """What a successful answer's JSON body carries, for a service that answers 200 with
    its error in the body: `{field: errcode, equals: 0}`."""

    field: str = Field(min_length=1)
    equals: int | bool | str


# Chat webhooks whose answers only their own sink kind reads: behind `kind: http` a 200
# carrying an error would be recorded as delivered. A host matches itself and its
# subdomains (ptb.discord.com, a connector's <tenant>.webhook.office.com).
_ROBOT_HOSTS = {
    "oapi.dingtalk.com": "dingtalk",
    "open.feishu.cn": "feishu",
    "open.larksuite.com": "feishu",
    "qyapi.weixin.qq.com": "wecom",
    "hooks.slack.com": "slack",
    "discord.com": "discord",
    "discordapp.com": "discord",
    "webhook.office.com": "teams",
}


def _robot_kind(host: str) -> str | None:
    host = host.lower().rstrip(".")
    for known, kind in _ROBOT_HOSTS.items():
        if host == known or host.endswith("." + known):
            return kind
    return None


class HttpSinkConfig(_SinkBase):
    kind: Literal["http"]
    # A secret: service URLs may carry their token in the path or the query.
    url: Annotated[SecretStr, AfterValidator(_check_secret_url)]
    headers: dict[str, SecretStr] = {}  # often credentials: never logged or shown
    timeout: PositiveDuration = 10.0
    concurrency: int = Field(8, ge=1, le=256)
    rate_limit: Rate | None = None
    format: Literal["envelope", "cloudevents", "cloudevents-binary"] = "envelope"
    # Standard Webhooks signing; a list while rotating (one signature per secret).
    signing_secret: list[WhsecSecret] | None = None
    # A 2xx is delivered only when the JSON body has this field value.
    success: SuccessConfig | None = None

    @model_validator(mode="after")
    def _robots_have_their_own_kind(self) -> HttpSinkConfig:
        kind = _robot_kind(URL(self.url.get_secret_value()).host or "")
        if kind is not None:
            # Not quoted back: the URL is a secret. kind: http would send relay's envelope,
            # which no robot takes, and could not tell the robot's errors from success.
            raise ValueError(
                f"url is a {kind} webhook: use kind: {kind}, which sends it messages it"
                " takes and reads its answers"
            )
        return self

    @field_validator("signing_secret", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class _ChatSinkBase(_SinkBase):
    """What every chat sink has: a webhook URL that is its credential, a message text
    template, pacing and the roll-up of bursts."""

    # The webhook URL carries its token (path or query): kept secret.
    url: Annotated[SecretStr, AfterValidator(_check_secret_url)]
    # Jinja2 (sandboxed) rendering the message text; the envelope is its context.
    template: Annotated[str, AfterValidator(check_template)] | None = None
    timeout: PositiveDuration = 10.0
    # At least this long between two messages to the webhook (its rate limit).
    pace: PositiveDuration = 1.0
    # This many events or more taken at once become one digest message.
    rollup_threshold: int = Field(5, ge=2)
    rollup_keys: int = Field(10, ge=1, le=40)  # keys listed in a digest


class SlackSinkConfig(_ChatSinkBase):
    kind: Literal["slack"]


class MentionsConfig(_Model):
    """Whom a robot's message @-mentions (DingTalk `at`, WeCom `mentioned_*`)."""

    mobiles: list[str] = []
    user_ids: list[str] = []
    all: bool = False


ChatLanguage = Literal["zh-CN", "en"]


def _check_robot_secret(value: SecretStr | None) -> SecretStr | None:
    if value is not None and not value.get_secret_value().strip():
        raise ValueError("secret is empty")
    return value


def _check_dingtalk_secret(value: SecretStr | None) -> SecretStr | None:
    if value is not None and not value.get_secret_value().startswith("SEC"):
        raise ValueError("secret is the robot's 加签 secret, which starts with SEC")
    return _check_robot_secret(value)


class DingTalkSinkConfig(_ChatSinkBase):
    kind: Literal["dingtalk"]
    # The robot's "加签" secret (SEC...): each request is signed with it.
    secret: Annotated[SecretStr | None, AfterValidator(_check_dingtalk_secret)] = None

    @model_validator(mode="after")
    def _has_access_token(self) -> DingTalkSinkConfig:
        if not URL(self.url.get_secret_value()).query.get("access_token"):
            raise ValueError("url has no access_token: copy the robot's whole Webhook URL")
        return self

    msgtype: Literal["markdown", "text"] = "markdown"
    at: MentionsConfig = MentionsConfig()
    # The robot's 自定义关键词 (custom keyword) security setting: a word every message must
    # carry. relay puts it at the head of each message, digests included.
    keyword: str | None = Field(None, min_length=1, max_length=64)
    language: ChatLanguage = "zh-CN"
    # 20 messages a minute per robot, then a 10-minute block: one every 3 s.
    pace: PositiveDuration = 3.0


class FeishuSinkConfig(_ChatSinkBase):
    kind: Literal["feishu"]
    # The bot's signature secret: each request carries timestamp and sign.
    secret: Annotated[SecretStr | None, AfterValidator(_check_robot_secret)] = None
    msgtype: Literal["interactive", "text", "post"] = "interactive"
    # The robot's 自定义关键词 (custom keyword) security setting: a word every message must
    # carry. relay puts it at the head of each message, digests included.
    keyword: str | None = Field(None, min_length=1, max_length=64)
    language: ChatLanguage = "zh-CN"
    # 100 a minute and 5 a second per bot: one every 0.6 s keeps within both.
    pace: PositiveDuration = 0.6


class WeComSinkConfig(_ChatSinkBase):
    kind: Literal["wecom"]
    msgtype: Literal["markdown", "text"] = "markdown"
    at: MentionsConfig = MentionsConfig()  # text messages only: markdown cannot mention
    language: ChatLanguage = "zh-CN"
    # 20 messages a minute per robot: one every 3 s.
    pace: PositiveDuration = 3.0

    @model_validator(mode="after")
    def _mentions_need_text(self) -> WeComSinkConfig:
        at = self.at
        if self.msgtype == "markdown" and (at.mobiles or at.user_ids or at.all):
            raise ValueError(
                "at needs msgtype: text (relay mentions through mentioned_list, which only"
                " WeCom's text messages take)"
            )
        return self


def _check_discord_username(value: str | None) -> str | None:
    # Discord refuses (400) a webhook username containing these: every message would
    # be dead-lettered.
    if value is not None and any(w in value.lower() for w in ("discord", "clyde")):
        raise ValueError('username must not contain "discord" or "clyde" (Discord refuses it)')
    return value


class DiscordSinkConfig(_ChatSinkBase):
    kind: Literal["discord"]
    username: Annotated[
        str | None, Field(min_length=1, max_length=80), AfterValidator(_check_discord_username)
    ] = None
    avatar_url: Annotated[str, AfterValidator(_check_http_url)] | None = None
    language: ChatLanguage = "en"
    # 5 requests per 2 s per webhook, 30 messages a minute per channel: one every 2 s.
    pace: PositiveDuration = 2.0


class TeamsSinkConfig(_ChatSinkBase):
    kind: Literal["teams"]
    language: ChatLanguage = "en"
    pace: PositiveDuration = 1.0


SourceConfig = Annotated[
    QingStorSourceConfig
    | StandardWebhooksSourceConfig
    | HmacSourceConfig
    | GenericSourceConfig
    | S3SourceConfig
    | CloudEventsSourceConfig,
    Field(discriminator="kind"),
]
SinkConfig = Annotated[
    FileSinkConfig
    | HttpSinkConfig
    | SlackSinkConfig
    | DingTalkSinkConfig
    | FeishuSinkConfig
    | WeComSinkConfig
    | DiscordSinkConfig
    | TeamsSinkConfig,
    Field(discriminator="kind"),
]


# Other names people give the platforms.
_KIND_ALIASES = {
    "lark": "feishu",
    "dingding": "dingtalk",
    "weixin": "wecom",
    "wechat": "wecom",
    "wework": "wecom",
    "msteams": "teams",
    "webhook": "http",
}


def _kinds(union: Any) -> tuple[str, ...]:
    """The `kind`s of a discriminated union of config models: one list, the union's."""
    members = get_args(get_args(union)[0])
    return tuple(get_args(m.model_fields["kind"].annotation)[0] for m in members)


SOURCE_KINDS = _kinds(SourceConfig)
SINK_KINDS = _kinds(SinkConfig)


class Conditions(_Model):
    event_types: list[str] | None = None
    buckets: list[str] | None = None
    keys: list[str] | None = None  # glob patterns, as in QingStor's object_filters
    sources: list[str] | None = None
    notification_ids: list[str] | None = None
    prefixes: list[str] | None = None
    suffixes: list[str] | None = None
    min_size: int | None = Field(None, ge=0)
    max_size: int | None = Field(None, ge=0)

    @field_validator("event_types")
    @classmethod
    def _normalize(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [normalize_event_type(v) for v in value]

    @cached_property
    def type_globs(self) -> tuple[str, ...]:
        """The `event_types` that are glob patterns (`s3:ObjectCreated:*`); routing
        tries these only after the names, which match by equality."""
        return tuple(t for t in self.event_types or () if any(c in t for c in "*?["))


class Not(Conditions):
    """Conditions that must NOT hold: the event is refused if any one given holds."""


class When(Conditions):
    """All given conditions must hold; a missing condition holds for every event."""

    not_: Not | None = Field(None, alias="not")


class Route(_Model):
    when: When | None = None
    to: list[str] = Field(min_length=1)


class ConsoleConfig(_Model):
    """The operator console: off unless a token is set. Every page and action takes
    `Authorization: Bearer <token>`; people sign in with it through a form."""

    # Long enough not to be guessed by a form posted over and over.
    token: Annotated[SecretStr, AfterValidator(_check_console_token)]
    # A listener of its own (host:port), e.g. an internal interface while the main port
    # faces QingStor; None: under /console/ on the main port.
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _, port = value.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("listen must be host:port, such as 127.0.0.1:8081")
        return value.strip()


class RelayConfig(_Model):
    server: ServerConfig = ServerConfig()
    console: ConsoleConfig | None = None
    # Validated even when absent, so that its relative path follows the config file.
    store: StoreConfig = Field(default_factory=lambda: {}, validate_default=True)
    dedupe: DedupeConfig = DedupeConfig()
    log: LogConfig = LogConfig()
    sources: dict[str, SourceConfig] = {}
    sinks: dict[str, SinkConfig] = {}
    # None (the key absent) sends every event to every sink; [] routes nothing.
    routes: list[Route] | None = None

    @property
    def effective_routes(self) -> list[Route]:
        if self.routes is None:
            return [Route(to=list(self.sinks))] if self.sinks else []
        return self.routes

    def summary(self) -> str:
        routes = len(self.effective_routes)
        return (
            f"{len(self.sources)} source(s) ({', '.join(self.sources) or 'none'}), "
            f"{len(self.sinks)} sink(s) ({', '.join(self.sinks) or 'none'}), "
            f"{routes} route(s), store {store_description(self.store)}"
        )


def store_description(store: SqliteStoreConfig | RedisStoreConfig) -> str:
    """The store as logs and messages may name it: never a password."""
    if isinstance(store, SqliteStoreConfig):
        return f"sqlite at {store.path}"
    return f"redis at {redacted_url(store.url.get_secret_value())} (prefix {store.prefix!r})"


def redacted_url(url: str) -> str:
    """A URL as messages and logs may show it: scheme, host, port and path only; the
    user info and the query (where a password travels) are dropped."""
    try:
        parsed = URL(url)
        if parsed.scheme == "unix":
            return f"unix://{parsed.path}"
        return str(parsed.with_user(None).with_password(None).with_query(None).with_fragment(None))
    except (ValueError, UnicodeError, TypeError):
        return f"{url.partition(':')[0]}://[unparseable url]"


# --- loading ---------------------------------------------------------------------------

# The embedded default (docs/configuration.md): a tokenless qingstor source, a file sink, SQLite,
# all under ./relay-data/, so that a newcomer's first `relay serve` just works.
DEFAULT_CONFIG: dict[str, Any] = {
    "store": {"backend": "sqlite", "path": "relay-data/relay.db"},
    "sources": {"qingstor": {"kind": "qingstor"}},
    "sinks": {"archive": {"kind": "file", "path": "relay-data/events.jsonl"}},
    "routes": [{"to": ["archive"]}],
}

_VAR = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}"
    # Spellings that look like a variable and would silently stay text: `$NAME` as the
    # shell writes it, and a `${` that is not a whole ${NAME} or ${NAME:-default}.
    r"|\$([A-Za-z_][A-Za-z0-9_]*)|\$\{"
)


def interpolate(
    value: Any, env: Mapping[str, str], path: str = "", problems: list[str] | None = None
) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string; `$$` is a literal `$`."""
    if problems is None:
        problems = []
    if isinstance(value, dict):
        return {
            k: interpolate(v, env, f"{path}.{k}" if path else str(k), problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}.{i}", problems) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(3) is not None:
            bare = match.group(3)
            problems.append(
                f"{path}: ${bare} is not expanded: write ${{{bare}}} for the variable"
                f" (or $${bare} for a literal $)"
            )
            return match.group(0)
        if match.group(1) is None:
            problems.append(
                f"{path}: a ${{ without its closing }} or with an invalid name: write"
                " ${VAR} or ${VAR:-default} (or $$ for a literal $)"
            )
            return match.group(0)
        name, default = match.group(1), match.group(2)
        # As in the shell: `:-` takes the default when the variable is unset or empty.
        if env.get(name):
            return env[name]
        if default is not None:
            return default
        if name in env:
            return ""
        problems.append(f"{path}: environment variable {name} is not set")
        return ""

    return _VAR.sub(substitute, value)


def _format_error(error: Any) -> str:
    loc = [str(part) for part in error["loc"]]
    # Discriminated unions put the chosen tag into the location; people wrote no such key.
    if len(loc) >= 3 and loc[0] in ("sinks", "sources") and loc[2] in (*SINK_KINDS, *SOURCE_KINDS):
        del loc[2]
    if len(loc) >= 2 and loc[0] == "store" and loc[1] in STORE_BACKENDS:
        del loc[1]
    kind = error["type"]
    if loc[:1] == ["store"] and (
        kind in ("union_tag_invalid", "union_tag_not_found")
        or (kind == "literal_error" and loc[-1] == "backend")
    ):
        given = error["input"].get("backend") if isinstance(error["input"], dict) else None
        return (
            f"store.backend: unknown backend {given!r}"
            f" (expected one of: {', '.join(STORE_BACKENDS)})"
        )
    if kind in ("union_tag_invalid", "union_tag_not_found") or (
        kind == "literal_error" and loc and loc[-1] == "kind"
    ):
        if loc[-1] != "kind":
            loc.append("kind")
        expected = ", ".join(SINK_KINDS if loc[0] == "sinks" else SOURCE_KINDS)
        given = error["input"].get("kind") if isinstance(error["input"], dict) else error["input"]
        if given is None:
            return f"{'.'.join(loc)}: missing (expected one of: {expected})"
        kinds = SINK_KINDS if loc[0] == "sinks" else SOURCE_KINDS
        meant = _KIND_ALIASES.get(str(given).lower()) or next(
            iter(difflib.get_close_matches(str(given), kinds, n=1, cutoff=0.6)), None
        )
        hint = f"did you mean {meant!r}? " if meant in kinds else ""
        return f"{'.'.join(loc)}: unknown kind {given!r} ({hint}expected one of: {expected})"
    if kind == "extra_forbidden" and len(loc) == 2 and loc[0] == "store":
        # A key of the other backend: say which backend it belongs to.
        tag = str(error["loc"][1]) if len(error["loc"]) > 2 else "sqlite"
        for backend, other in (("sqlite", SqliteStoreConfig), ("redis", RedisStoreConfig)):
            if backend != tag and loc[1] in other.model_fields:
                return f"store.{loc[1]}: a key of backend {backend}; set store.backend: {backend}"
    if kind == "extra_forbidden":
        return _unknown_key(error, loc)
    return config_problems.describe({**error, "loc": tuple(loc)}, RelayConfig)


def _unknown_key(error: Any, shown: list[str]) -> str:
    # Matched against the keys of the model the location names, tag included (which
    # kind of sink a typo sits in), then shown without the tag.
    worded = config_problems.describe(error, RelayConfig)
    return ".".join(shown) + worded[worded.index(":") :]


def _names(data: dict[str, Any], section: str) -> list[str]:
    value = data.get(section)
    return [str(name) for name in value] if isinstance(value, dict) else []


def _check_references(data: dict[str, Any]) -> list[str]:
    """Names and what routes refer to, read from the document itself, so that they are
    reported in the same round as every other problem, even when those fail validation."""
    problems = []
    sources, sinks = _names(data, "sources"), _names(data, "sinks")
    for section, names in (("sources", sources), ("sinks", sinks)):
        for name in names:
            if not _NAME.match(name):
                problems.append(
                    f"{section}.{name}: names are 1-64 letters, digits, '_', '.' or '-'"
                )
    routes = data.get("routes")
    for i, route in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(route, dict):
            continue
        targets = route.get("to")
        for sink in targets if isinstance(targets, list) else []:
            if isinstance(sink, str) and sink not in sinks:
                problems.append(f"routes.{i}.to: undefined sink {sink!r}{_defined(sink, sinks)}")
        when = route.get("when")
        conditions = [("when", when)]
        if isinstance(when, dict):
            conditions.append(("when.not", when.get("not")))
        for where, condition in conditions:
            wanted = condition.get("sources") if isinstance(condition, dict) else None
            for source in wanted if isinstance(wanted, list) else []:
                if isinstance(source, str) and source not in sources:
                    problems.append(
                        f"routes.{i}.{where}.sources: undefined source {source!r}"
                        f"{_defined(source, sources)}"
                    )
    return problems


def _defined(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (defined: {', '.join(names) or 'none'})"


def _check_purpose(data: dict[str, Any]) -> list[str]:
    """A config that can do nothing is a mistake, never what the operator meant."""
    if not data:
        return [
            "(top level): the config is empty: relay needs at least one source and one sink"
            " (see config/relay.example.yaml)"
        ]
    problems = []
    if not data.get("sources"):
        problems.append("sources: no source is defined, so relay would accept no events")
    if not data.get("sinks"):
        problems.append("sinks: no sink is defined, so relay would deliver no events")
    if data.get("routes") == []:
        problems.append(
            "routes: the list is empty, so no event would reach any sink (leave the key out"
            " to send every event to every sink)"
        )
    return problems


def build_config(
    data: Any,
    *,
    base_dir: Path,
    env: Mapping[str, str] | None = None,
    complete: bool = False,
) -> RelayConfig:
    """Validate an already-parsed document; raises ConfigError listing every problem.
    `complete`: a whole config to run, refused when it could do nothing (no source, no
    sink, no route); tests and tools may build partial ones."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of sections"])
    problems: list[str] = []
    data = interpolate(data, os.environ if env is None else env, problems=problems)
    if complete:
        problems.extend(_check_purpose(data))
    # An empty section (`sinks:` with every entry commented out) is an absent one.
    data = {key: value for key, value in data.items() if value is not None}
    problems.extend(_check_references(data))
    try:
        config = RelayConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        # A missing variable was reported already; its empty stand-in says nothing new.
        reported = {p.split(":", 1)[0] for p in problems}
        for error in exc.errors():
            message = _format_error(error)
            if message.split(":", 1)[0] not in reported:
                problems.append(message)
        raise ConfigError(_in_document_order(problems, data)) from None
    if problems:
        raise ConfigError(_in_document_order(problems, data))
    return config


def _in_document_order(problems: list[str], data: dict[str, Any]) -> list[str]:
    """Problems sorted by where their section comes in the file, so that one section's
    problems read together; within a section, the order they were found in."""
    order = {key: i for i, key in enumerate(data)}

    def section(problem: str) -> int:
        head = problem.split(":", 1)[0].split(".", 1)[0]
        return order.get(head, -1 if head == "(top level)" else len(order))

    return sorted(problems, key=section)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> RelayConfig:
    """Load a config file; relative paths in it follow the file."""
    file = Path(path)
    return parse_config(read_config_text(file), str(file), file.resolve().parent, env)


def read_config_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot read ({exc.__class__.__name__}: {exc})"]) from None


def parse_config(
    text: str, name: str, base_dir: Path, env: Mapping[str, str] | None = None
) -> RelayConfig:
    """A config from its YAML text; `name` is what problems call it."""
    return build_config(_parse_yaml(text, name), base_dir=base_dir, env=env, complete=True)


def _parse_yaml(text: str, name: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Never str(exc): it quotes the offending line, which may hold a secret.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "cannot parse"
        raise ConfigError([f"{name}: invalid YAML{where}: {problem}"]) from None


class _StoreSections(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    store: StoreConfig = Field(default_factory=lambda: {}, validate_default=True)
    dedupe: DedupeConfig = DedupeConfig()


class StoreView(_Model):
    """What the operator commands (`relay status`, `relay dlq`, `relay backup`) need of a
    config: its store, and the names of its sinks and sources."""

    store: StoreConfig
    dedupe: DedupeConfig
    sinks: tuple[str, ...]
    sources: tuple[str, ...]

    @classmethod
    def of(cls, config: RelayConfig) -> StoreView:
        return cls(
            store=config.store,
            dedupe=config.dedupe,
            sinks=tuple(config.sinks),
            sources=tuple(config.sources),
        )


def load_store_view(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> StoreView:
    """The store sections of a config file (None: the embedded default's), the rest read
    for its names only: an operator's shell need not hold the sinks' and sources'
    secrets, whose `${VAR}`s are never expanded here."""
    if path is None:
        data: Any = DEFAULT_CONFIG
        base_dir, env = Path.cwd(), {}
    else:
        file = Path(path)
        data = _parse_yaml(read_config_text(file), str(file))
        base_dir = file.resolve().parent
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of sections"])
    problems: list[str] = []
    wanted = {k: data[k] for k in ("store", "dedupe") if data.get(k) is not None}
    wanted = interpolate(wanted, os.environ if env is None else env, problems=problems)
    try:
        sections = _StoreSections.model_validate(wanted, context={"base_dir": base_dir})
    except ValidationError as exc:
        reported = {p.split(":", 1)[0] for p in problems}
        problems += [
            m for m in map(_format_error, exc.errors()) if m.split(":", 1)[0] not in reported
        ]
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return StoreView(
        store=sections.store,
        dedupe=sections.dedupe,
        sinks=tuple(_names(data, "sinks")),
        sources=tuple(_names(data, "sources")),
    )


def default_config() -> RelayConfig:
    return build_config(DEFAULT_CONFIG, base_dir=Path.cwd(), env={}, complete=True)
