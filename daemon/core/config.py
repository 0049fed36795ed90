"""trigd's configuration (docs/OPERATIONS.md#configuration): defaults < TOML file < TRIGD_*
environment < CLI flags.

Every key is declared, so a typo is an error naming it rather than a silently ignored
setting. Problems are collected across all sources and raised together as one
`ConfigError` (exit 2), each line naming where the value came from (the file, the
environment variable or the flag), the `[section] key`, and why it is wrong.

Relative paths: `store.path` lives under `$STATE_DIRECTORY` when systemd sets it, else
under the current directory. Automation globs and TLS files named in a config file are
relative to that file's directory (a unit runs with cwd `/`); from the environment or a
flag they are relative to the current directory. `load_config` returns absolute paths.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from datetime import timedelta
from ipaddress import IPv6Address, ip_address
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from daemon.core.durations import format_duration, parse_duration
from daemon.core.events import (
    DEFAULT_MAX_JSON_DEPTH,
    MAX_JSON_DEPTH_CEILING,
    MIN_JSON_DEPTH,
    error_reason,
)
from daemon.core.log_throttle import DEFAULT_LIMITS, LogLimits

# The causal ordering's defaults (`daemon.engine.ordering`), the `[ordering]` settings.
PRECEDING_EVENT_LOOKBACK: Final = timedelta(minutes=15)  # max wait for a leader
SEEN_EXPIRATION: Final = timedelta(hours=1)  # trigd: by time only, never by count
MAX_DEPTH_OF_PRECEDING_EVENT: Final = 20  # followers released per original arrival

Synchronous = Literal["full", "normal"]
"""`[store] synchronous`, as `store.db.Store.open` takes it."""

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
"""`[log] level` (and `trigd serve --log-level`), as the logging module names them."""
LogFormat = Literal["text", "json"]
"""`[log] format`: plain lines, or one JSON object a line."""

ENV_PREFIX: Final = "TRIGD_"
AUTH_TOKEN_ENV: Final = "TRIGD_SERVER_AUTH_TOKEN"
"""`[server] auth_token` from the environment: what `serve` requires and, by the same name,
what `trigd emit` presents, so one exported variable serves both."""
CLIENT_ENV_VARS: Final = frozenset({"TRIGD_TOKEN"})
"""TRIGD_* variables read by client commands (`trigd emit`'s older name for the token), not
configuration."""

FLAG_KEYS: Final[Mapping[str, tuple[str, str]]] = MappingProxyType(
    {
        "listen": ("server", "listen"),
        "db": ("store", "path"),
        "automations": ("triggers", "automations"),
    }
)
"""`overrides` keys (CLI flags) and the setting each one replaces."""

_LABEL: Final = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME: Final = re.compile(rf"{_LABEL}(\.{_LABEL})*")
"""A DNS name: labels of 1-63 letters, digits and inner hyphens (a longer label fails in
the resolver's IDNA codec, as a UnicodeError rather than an unknown host)."""
MAX_HOSTNAME: Final = 253


class ConfigError(Exception):
    """A configuration that cannot be used; one line per problem (source, key, why)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = tuple(problems)


class UnusableSetting(Exception):
    """A valid setting that failed when start-up used it: the listen address, a TLS file,
    the database path. The message names the key, its flag if it has one, and the value:
    ``[server] listen (--listen) 127.0.0.1:4280: address already in use``.

    ``lasting`` says whether the value itself cannot work (bad configuration, exit 2) or
    something outside trigd is in its way for now, such as another process holding the
    port, so that the same configuration may work on a retry (exit 1: systemd restarts).
    """

    def __init__(
        self, section: str, key: str, value: object, why: str, *, lasting: bool = True
    ) -> None:
        flags = [f"--{flag}" for flag, setting in FLAG_KEYS.items() if setting == (section, key)]
        named = f"[{section}] {key}" + "".join(f" ({flag})" for flag in flags)
        super().__init__(f"{named} {value}: {why}")
        self.section = section
        self.key = key
        self.lasting = lasting


def _field_problem(key: str, why: str) -> PydanticCustomError:
    """An error of a cross-key rule, carrying the key it should be reported under."""
    return PydanticCustomError("config_field", "{why}", {"key": key, "why": why})


# --- value types ---------------------------------------------------------------------------


def _duration(value: Any) -> Any:
    return value if isinstance(value, timedelta) else parse_duration(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"must be at least 1, got {number}")
    return number


def _listen(value: Any) -> str:
    """`HOST:PORT`, IPv6 hosts in brackets; normalised so that `host`/`port` can split it."""
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT such as '127.0.0.1:4280', got {value!r}")
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT such as '127.0.0.1:4280', got {value!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    if host.startswith("[") and host.endswith("]"):
        try:
            IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        return f"{host}:{port}"
    if not host:
        raise ValueError(f"no host in {value!r}; use 0.0.0.0:{port} for every interface")
    try:
        ip_address(host)
    except ValueError:
        if len(host) > MAX_HOSTNAME or not _HOSTNAME.fullmatch(host):
            raise ValueError(
                f"{host!r} is not a host name or address (IPv6 goes in brackets: '[::1]:4280')"
            ) from None
    else:
        if ":" in host:
            raise ValueError(f"IPv6 addresses go in brackets: '[{host}]:{port}'")
    return f"{host}:{port}"


def _uppercase(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _lowercase(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _optional_path(value: Any) -> Any:
    if isinstance(value, str):
        return Path(value).expanduser() if value.strip() else None
    return value


def _path(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty")
        return Path(value).expanduser()
    return value


def _globs(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError(f"expected a list of files or globs, got the string {value!r}")
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError(f"must be longer than 0s, got {format_duration(value)}")
    return value


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
Count = Annotated[int, BeforeValidator(_count)]


def _json_depth(value: int) -> int:
    if not MIN_JSON_DEPTH <= value <= MAX_JSON_DEPTH_CEILING:
        raise ValueError(
            f"must be {MIN_JSON_DEPTH}..{MAX_JSON_DEPTH_CEILING}, got {value} (an event needs "
            f"{MIN_JSON_DEPTH} levels; trigd nests events deeper in its own, and JSON past "
            "about 200 levels cannot be read back)"
        )
    return value


JsonDepth = Annotated[Count, AfterValidator(_json_depth)]
OptionalFile = Annotated[Path | None, BeforeValidator(_optional_path)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


# --- sections ------------------------------------------------------------------------------


class ServerConfig(Section):
    listen: Annotated[str, BeforeValidator(_listen)] = "127.0.0.1:4280"
    auth_token: str = Field("", repr=False)  # when set, every websocket must present it
    tls_cert: OptionalFile = None  # PEM; with tls_key, serve wss://
    tls_key: OptionalFile = None
    max_event_bytes: Count = 1_500_000  # bytes per event frame
    max_json_depth: JsonDepth = DEFAULT_MAX_JSON_DEPTH  # nesting levels of an event
    max_connections: Count = 64  # established websockets (handshake done) at once
    max_pending_handshakes: Count = 16  # sockets still in their handshake at once
    max_connections_per_peer: Count = 16  # pending + established from one address (IPv6: /64)
    queue_depth: Count = 1_000  # events in flight between ingest and evaluation
    batch_max_events: Count = 500  # events committed in one transaction at most
    handshake_timeout: PositiveDuration = timedelta(seconds=10)  # to finish websocket + auth
    idle_timeout: PositiveDuration = timedelta(minutes=5)  # no frame for this long: closed
    shutdown_timeout: PositiveDuration = timedelta(seconds=5)  # to commit in-flight work
    # plain HTTP on the same port (docs/PROTOCOL.md#http)
    max_request_head_bytes: Count = 16_384  # request line and headers of one request
    max_request_bytes: Count = 4_000_000  # body of one request (POST /api/events): else 413
    request_timeout: PositiveDuration = timedelta(seconds=10)  # to read a body, answer, reply
    keepalive_timeout: PositiveDuration = timedelta(seconds=5)  # idle between requests
    http_readers: Count = 2  # requests reading the database at once (explain, events query)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].removeprefix("[").removesuffix("]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise _field_problem(missing, "tls_cert and tls_key must be set together")
        return self


COMMIT_LINGER: Final = timedelta(milliseconds=5)
COMMIT_LINGER_EVENTS: Final = 64
MAX_COMMIT_LINGER: Final = timedelta(seconds=1)
INBOX_PUMP_DELAY: Final = timedelta(milliseconds=20)
MAX_INBOX_PUMP_DELAY: Final = timedelta(seconds=1)
PAGE_CACHE_MIB: Final = 2
WAL_CHECKPOINT_PAGES: Final = 4_000  # about 16 MiB of WAL with 4 KiB pages
WAL_MAX_PAGES: Final = 16_000


def _at_most(bound: timedelta, why: str) -> Callable[[timedelta], timedelta]:
    """A validator refusing a duration over `bound`; `why` says what a longer one costs."""

    def check(value: timedelta) -> timedelta:
        if value > bound:
            raise ValueError(
                f"must be at most {format_duration(bound)} ({why}), got {format_duration(value)}"
            )
        return value

    return check


_short_pump_delay = _at_most(
    MAX_INBOX_PUMP_DELAY, "with no client events, trigd's own events wait this long"
)
_short_linger = _at_most(MAX_COMMIT_LINGER, "every ack waits up to this long")


class StoreConfig(Section):
    path: Annotated[Path, BeforeValidator(_path)] = Path("trigd.db")
    synchronous: Annotated[Synchronous, BeforeValidator(_lowercase)] = "full"
    event_retention: PositiveDuration = timedelta(days=7)
    outbox_retention: PositiveDuration = timedelta(days=7)  # delivered and dead rows
    # group commit's linger (docs/PERFORMANCE.md#commit-linger): after a batch's first
    # event, wait up to this long for more; "0s" = off
    commit_linger: Annotated[Duration, AfterValidator(_short_linger)] = COMMIT_LINGER
    commit_linger_events: Count = COMMIT_LINGER_EVENTS  # a batch this large stops lingering
    # trigd's own events (firings, webhook results) wait this long for an evaluator batch
    # to drain them before the inbox pump commits them itself; "0s" = at once
    inbox_pump_delay: Annotated[Duration, AfterValidator(_short_pump_delay)] = INBOX_PUMP_DELAY
    page_cache_mib: Count = PAGE_CACHE_MIB  # SQLite's page cache of the writer connection
    # WAL checkpoints beside the writer (docs/OPERATIONS.md#the-database-file): past this
    # many WAL frames, a background checkpoint; past the bound, the writer's COMMIT does it
    wal_checkpoint_pages: Count = WAL_CHECKPOINT_PAGES
    wal_max_pages: Count = WAL_MAX_PAGES

    @model_validator(mode="after")
    def _wal_bound_above_checkpoints(self) -> Self:
        if self.wal_max_pages <= self.wal_checkpoint_pages:
            raise _field_problem(
                "wal_max_pages",
                f"must be larger than wal_checkpoint_pages ({self.wal_checkpoint_pages}), "
                f"got {self.wal_max_pages}",
            )
        return self


class OrderingConfig(Section):
    preceding_event_lookback: Duration = PRECEDING_EVENT_LOOKBACK
    seen_expiration: PositiveDuration = SEEN_EXPIRATION
    max_depth: Count = MAX_DEPTH_OF_PRECEDING_EVENT


PROACTIVE_CHUNK: Final = 100
"""Default `[triggers] proactive_chunk`: a firing costs about 0.3 ms of store time, so a
step of 100 due buckets holds the store thread some 30 ms here."""


class TriggersConfig(Section):
    automations: Annotated[tuple[str, ...], BeforeValidator(_globs)] = ()
    proactive_granularity: PositiveDuration = timedelta(seconds=5)
    expired_bucket_buffer: Duration = timedelta(seconds=60)
    # buckets a proactive pass reads or deletes per transaction (acks wait at most one)
    proactive_chunk: Count = PROACTIVE_CHUNK


LEASE_FLOOR: Final = timedelta(seconds=60)
LEASE_MARGIN: Final = timedelta(seconds=30)
PER_ENDPOINT_CONCURRENCY: Final = 2
PROBE_CONCURRENCY: Final = 2


def derived_probe_concurrency(concurrency: int) -> int:
    """`probe_concurrency` when none is set: 2, and always a slot short of `concurrency` so
    failing endpoints leave one to the others (1 when there is only one slot)."""
    return max(1, min(PROBE_CONCURRENCY, concurrency - 1))


MAX_PER_ENDPOINT: Final = 32
FAST_ANSWER: Final = timedelta(milliseconds=250)


def derived_max_per_endpoint(concurrency: int, per_endpoint: int) -> int:
    """`max_per_endpoint` when none is set: 32, a slot short of `concurrency` so that one
    fast endpoint leaves a slot to the others, and never under `per_endpoint`."""
    return max(per_endpoint, min(MAX_PER_ENDPOINT, concurrency - 1))


CONCURRENCY_WHILE_INGESTING: Final = 2
"""Default `[delivery] concurrency_while_ingesting`: each delivery in flight costs the event
loop steps that every ack waits behind (docs/PERFORMANCE.md)."""
INGEST_QUIET_AFTER: Final = timedelta(milliseconds=100)


def derived_lease(timeout: timedelta) -> timedelta:
    """The lease when none is set: the attempt (`timeout`) plus time to commit its outcome,
    and never under a minute, so that every valid timeout works on its own."""
    return max(LEASE_FLOOR, timeout + LEASE_MARGIN)


class DeliveryConfig(Section):
    """`lease`, `per_endpoint_concurrency` and `probe_concurrency` are extensions
    (docs/DELIVERY.md#settings). Left unset they follow `timeout` and `concurrency`
    (`derived_lease`; at most `concurrency`; `derived_probe_concurrency`), so `timeout` or
    `concurrency` alone never fails because of a key the user did not write; set explicitly, they
    must agree with them."""

    timeout: PositiveDuration = timedelta(seconds=15)  # one HTTP attempt
    max_age: PositiveDuration = timedelta(hours=72)  # then a failing delivery is dead
    concurrency: Count = 8  # deliveries in flight, all endpoints
    # in flight to one scheme://host:port; unset: min(2, concurrency)
    per_endpoint_concurrency: Count = Field(None, validate_default=True)
    # in flight to failing endpoints (one each); unset: min(2, concurrency - 1), at least 1
    probe_concurrency: Count = Field(None, validate_default=True)
    # a claimed row is owned this long; unset: derived_lease(timeout)
    lease: PositiveDuration = Field(None, validate_default=True)
    # the window of an endpoint answering within fast_answer grows up to this;
    # unset: min(32, concurrency - 1), at least per_endpoint_concurrency
    max_per_endpoint: Count = Field(None, validate_default=True)
    fast_answer: PositiveDuration = FAST_ANSWER  # quicker answers widen the window
    # in flight to one endpoint while clients send events, however wide its window
    # (docs/DELIVERY.md#giving-way-to-acks); unset: min(2, concurrency)
    concurrency_while_ingesting: Count = Field(None, validate_default=True)
    # clients send events until no evaluator batch has begun for this long
    ingest_quiet_after: PositiveDuration = INGEST_QUIET_AFTER

    @field_validator("concurrency_while_ingesting", mode="before")
    @classmethod
    def _while_ingesting_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            return value
        # concurrency absent from info.data: it is invalid, and that is reported
        return min(CONCURRENCY_WHILE_INGESTING, info.data.get("concurrency", 1))

    @field_validator("max_per_endpoint", mode="before")
    @classmethod
    def _max_per_endpoint_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            return value
        # an invalid key is absent from info.data, and reported
        per_endpoint = info.data.get("per_endpoint_concurrency", PER_ENDPOINT_CONCURRENCY)
        return derived_max_per_endpoint(info.data.get("concurrency", per_endpoint), per_endpoint)

    @field_validator("per_endpoint_concurrency", mode="before")
    @classmethod
    def _per_endpoint_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            return value
        # concurrency absent from info.data: it is invalid, and that is reported
        return min(PER_ENDPOINT_CONCURRENCY, info.data.get("concurrency", PER_ENDPOINT_CONCURRENCY))

    @field_validator("probe_concurrency", mode="before")
    @classmethod
    def _probe_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            return value
        # concurrency absent from info.data: it is invalid, and that is reported
        return derived_probe_concurrency(info.data.get("concurrency", PROBE_CONCURRENCY + 1))

    @field_validator("lease", mode="before")
    @classmethod
    def _lease_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            return value
        # timeout absent from info.data: it is invalid, and that is reported
        return derived_lease(info.data.get("timeout", timedelta(0)))

    @model_validator(mode="after")
    def _explicit_extensions_agree(self) -> Self:
        """Only values set explicitly can break these rules; derived ones satisfy them."""
        if self.lease <= self.timeout:
            raise _field_problem(
                "lease",
                f"must be longer than timeout ({format_duration(self.timeout)}), "
                f"got {format_duration(self.lease)}",
            )
        if self.per_endpoint_concurrency > self.concurrency:
            raise _field_problem(
                "per_endpoint_concurrency",
                f"must not exceed concurrency ({self.concurrency}), "
                f"got {self.per_endpoint_concurrency}",
            )
        if not self.per_endpoint_concurrency <= self.max_per_endpoint <= self.concurrency:
            raise _field_problem(
                "max_per_endpoint",
                f"must be from per_endpoint_concurrency ({self.per_endpoint_concurrency}) "
                f"to concurrency ({self.concurrency}), got {self.max_per_endpoint}",
            )
        if self.concurrency_while_ingesting > self.concurrency:
            raise _field_problem(
                "concurrency_while_ingesting",
                f"must not exceed concurrency ({self.concurrency}), "
                f"got {self.concurrency_while_ingesting}",
            )
        if self.probe_concurrency > max(1, self.concurrency - 1):
            bound = (
                "must be 1 when concurrency is 1"
                if self.concurrency == 1
                else f"must be less than concurrency ({self.concurrency}), so that failing "
                "endpoints leave a slot to the others"
            )
            raise _field_problem("probe_concurrency", f"{bound}, got {self.probe_concurrency}")
        return self


class LogConfig(Section):
    """`level` and `format` of the daemon's log lines (`--log-level` overrides `level`).
    Lines one event can cause (refused with a traceback, a batch split) are rate limited
    per kind: `burst` per `window`, then a count of those left out."""

    level: Annotated[LogLevel, BeforeValidator(_uppercase)] = "INFO"
    format: Annotated[LogFormat, BeforeValidator(_lowercase)] = "text"
    burst: Count = DEFAULT_LIMITS.burst
    window: PositiveDuration = timedelta(seconds=DEFAULT_LIMITS.window)

    @property
    def limits(self) -> LogLimits:
        return LogLimits(self.burst, self.window.total_seconds())


class InsightConfig(Section):
    """How much `trigd explain` reads and lists, and how `trigd backtest` replays
    (docs/INSIGHT.md)."""

    recent_events: Count = 1_000  # stored events explain scans, newest first
    listed: Count = 10  # entries per list in an explanation
    backtest_batch: Count = 2_000  # events a backtest replays per transaction
    backtest_bucket_cache: Count = 100_000  # buckets a backtest keeps in memory between batches
    backtest_seen_cache: Count = 500_000  # seen marks a backtest keeps in memory, not written


class EventsOutConfig(Section):
    """Subscribers of `/api/events/out` (`trigd tail`, Prefect's event subscriber): how far
    back their backfill reaches, and the bounds that keep one too slow from holding
    memory or a connection."""

    backfill: PositiveDuration = timedelta(minutes=15)  # stored events sent first, at most this old
    backfill_max_events: Count = 1_000  # and at most this many (the newest)
    queue_depth: Count = 1_000  # events waiting for one subscriber; past it: closed (1013)
    send_timeout: PositiveDuration = timedelta(seconds=30)  # one frame to a subscriber


# --- [upstream] ------------------------------------------------------------------------------

EVENT_FILTER_KEYS: Final = frozenset({"event", "resource", "related", "any_resource", "id", "text"})
"""The keys of Prefect's EventFilter that `[upstream] subscribe` may set. `occurred` and
`order` are not among them: trigd sets them from the persisted position (ascending)."""


def _api_url(value: Any) -> str:
    """A Prefect API URL (http or https, no query or fragment), or "" for off."""
    if not isinstance(value, str):
        raise ValueError(
            f"expected an http(s) URL such as 'http://prefect:4200/api', got {value!r}"
        )
    text = value.strip().rstrip("/")
    if not text:
        return ""
    scheme, sep, rest = text.partition("://")
    host = rest.split("/", 1)[0].rpartition("@")[2]
    if not sep or scheme.lower() not in ("http", "https") or not host:
        raise ValueError(
            f"expected an http(s) URL such as 'http://prefect:4200/api', got {value!r}"
        )
    if "?" in rest or "#" in rest:
        raise ValueError("the API URL takes no query or fragment")
    if "@" in rest.split("/", 1)[0]:
        raise ValueError("credentials go in auth_string or api_key, not in the URL")
    return text


def _event_filter(value: Any) -> dict[str, Any]:
    """A JSON object in the shape of Prefect's EventFilter (given as a TOML table, or as a
    JSON string from the environment); {} = off."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(
            "expected an EventFilter table such as "
            f'{{event = {{prefix = ["prefect.flow-run."]}}}}, got {value!r}'
        )
    unknown = sorted(set(value) - EVENT_FILTER_KEYS)
    if unknown:
        fixed = (
            " (trigd sets it from the position it keeps)"
            if {"occurred", "order"} & set(unknown)
            else ""
        )
        raise ValueError(
            f"unknown EventFilter key {unknown[0]!r}{fixed}; expected some of "
            + ", ".join(sorted(EVENT_FILTER_KEYS))
        )
    for key, part in value.items():
        if key == "related" and isinstance(part, list):
            if not all(isinstance(item, dict) for item in part):
                raise ValueError("related: expected a table or a list of tables")
        elif not isinstance(part, dict):
            raise ValueError(f"{key}: expected a table, got {part!r}")
    return dict(value)


class UpstreamConfig(Section):
    """`[upstream]`: trigd beside a Prefect server (README.md#trigd-beside-your-prefect-server).
    `auth_string` and `api_key` may be references (`env:NAME`, `file:PATH`,
    `credential:NAME`, `literal:...`, as in daemon/core/references.py), resolved at start;
    neither is ever shown. The keys after `backlog` are limits, extensions of the contract."""

    url: Annotated[str, BeforeValidator(_api_url)] = ""  # the Prefect API URL; "" = off
    auth_string: str = Field("", repr=False)  # a self-hosted server's auth string
    api_key: str = Field("", repr=False)  # Prefect Cloud's API key, sent as Bearer
    forward: bool = True  # send committed events upstream (when url is set)
    subscribe: Annotated[dict[str, Any], BeforeValidator(_event_filter)] = Field(
        default_factory=dict
    )  # an EventFilter; {} = off
    backlog: PositiveDuration = timedelta(days=7)  # keep unforwarded events at most this long
    page_events: Count = 500  # events sent between two checkpoints (one cursor write each)
    timeout: PositiveDuration = timedelta(seconds=30)  # connect, auth and each checkpoint
    retry_max: PositiveDuration = timedelta(seconds=60)  # longest wait between reconnects
    max_message_bytes: Count = 4_194_304  # largest /events/out message read (then refused)
    settle: PositiveDuration = timedelta(milliseconds=500)  # open this long after a pong
    resend_window: PositiveDuration = timedelta(seconds=10)  # confirmed pages resent on a close

    @property
    def forwarding(self) -> bool:
        return bool(self.url) and self.forward

    @property
    def subscribing(self) -> bool:
        return bool(self.url) and bool(self.subscribe)

    @model_validator(mode="after")
    def _one_credential(self) -> Self:
        if self.auth_string and self.api_key:
            raise _field_problem(
                "api_key",
                "set auth_string (a self-hosted server) or api_key (Prefect Cloud), not both",
            )
        return self


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    ordering: OrderingConfig = OrderingConfig()
    triggers: TriggersConfig = TriggersConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    log: LogConfig = LogConfig()
    insight: InsightConfig = InsightConfig()
    events_out: EventsOutConfig = EventsOutConfig()
    upstream: UpstreamConfig = UpstreamConfig()


SECTIONS: Final[Mapping[str, type[Section]]] = MappingProxyType(
    {
        "server": ServerConfig,
        "store": StoreConfig,
        "ordering": OrderingConfig,
        "triggers": TriggersConfig,
        "delivery": DeliveryConfig,
        "log": LogConfig,
        "insight": InsightConfig,
        "events_out": EventsOutConfig,
        "upstream": UpstreamConfig,
    }
)


# --- loading -------------------------------------------------------------------------------


class _Source:
    """Where a value came from: names it in messages, anchors its relative paths."""

    def __init__(self, label: str, base: Path | None = None) -> None:
        self.label = label
        self.base = base

    def problem(self, section: str, key: str, why: str) -> str:
        return f"{self.label}: [{section}] {key}: {why}"


_DEFAULTS: Final = _Source("defaults")


class _Layers:
    """The raw values of every source, merged by precedence, with their origins."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        self.origins: dict[tuple[str, str], _Source] = {}
        self.problems: list[str] = []

    def set(self, section: str, key: str, value: Any, source: _Source) -> None:
        self.values[section][key] = value
        self.origins[section, key] = source

    def origin(self, section: str, key: str) -> _Source:
        if (section, key) in self.origins:
            return self.origins[section, key]
        # A cross-key rule broken by a default: blame whoever set something in the section.
        set_here = [source for (s, _), source in self.origins.items() if s == section]
        return set_here[-1] if set_here else _DEFAULTS


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_file(path: Path, layers: _Layers) -> None:
    label = str(path)
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        layers.problems.append(f"{label}: no such file")
        return
    except IsADirectoryError:
        layers.problems.append(f"{label}: is a directory, not a TOML file")
        return
    except OSError as exc:
        layers.problems.append(f"{label}: cannot read: {exc.strerror or exc}")
        return
    except UnicodeDecodeError:
        layers.problems.append(f"{label}: not valid TOML: the file is not UTF-8")
        return
    except tomllib.TOMLDecodeError as exc:
        layers.problems.append(f"{label}: not valid TOML: {exc}")
        return
    source = _Source(label, path.parent.absolute())
    for name, table in document.items():
        if name not in SECTIONS:
            owners = [s for s, model in SECTIONS.items() if name in model.model_fields]
            if owners and not isinstance(table, dict):
                where = f"outside any section (it belongs in [{owners[0]}])"
                layers.problems.append(f"{label}: unknown key {name!r} {where}")
            else:
                layers.problems.append(
                    f"{label}: unknown section [{name}]{_suggest(name, SECTIONS)}"
                )
            continue
        if not isinstance(table, dict):
            layers.problems.append(f"{label}: [{name}] must be a table, got {table!r}")
            continue
        fields = SECTIONS[name].model_fields
        for key, value in table.items():
            if key in fields:
                layers.set(name, key, value, source)
            else:
                layers.problems.append(
                    f"{label}: [{name}] unknown key {key!r}{_suggest(key, fields)}"
                )


def _env_list(text: str) -> Any:
    """A list from one string: a JSON array, or comma-separated items."""
    if text.strip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid JSON array: {exc}") from None
    return [item.strip() for item in text.split(",") if item.strip()]


def _is_list(section: str, key: str) -> bool:
    annotation = SECTIONS[section].model_fields[key].annotation
    return getattr(annotation, "__origin__", None) in (tuple, list)


def _read_env(env: Mapping[str, str], layers: _Layers) -> None:
    by_prefix = {f"{ENV_PREFIX}{name.upper()}_": name for name in SECTIONS}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in CLIENT_ENV_VARS:
            continue
        section = next((s for p, s in by_prefix.items() if var.startswith(p)), None)
        if section is None:
            sections = ", ".join(SECTIONS)
            layers.problems.append(
                f"{var}: unknown environment variable; trigd reads "
                f"TRIGD_<SECTION>_<KEY> with sections {sections}"
            )
            continue
        key = var.removeprefix(f"{ENV_PREFIX}{section.upper()}_").lower()
        fields = SECTIONS[section].model_fields
        if key not in fields:
            layers.problems.append(
                f"{var}: unknown environment variable: [{section}] has no key {key!r}"
                f"{_suggest(key, fields)}"
            )
            continue
        value: Any = env[var]
        if _is_list(section, key):
            try:
                value = _env_list(value)
            except ValueError as exc:
                layers.problems.append(_Source(var).problem(section, key, str(exc)))
                continue
        layers.set(section, key, value, _Source(var))


def _read_overrides(overrides: Mapping[str, Any], layers: _Layers) -> None:
    for name, value in overrides.items():
        if value is None:
            continue  # a flag not given
        if name in FLAG_KEYS:
            section, key = FLAG_KEYS[name]
            label = f"--{name}"
        else:
            section, _, key = name.partition(".")
            if key not in SECTIONS.get(section, Section).model_fields:
                raise ValueError(f"unknown configuration override {name!r}")
            label = f"override {name}"
        if isinstance(value, Path):
            value = str(value)
        layers.set(section, key, value, _Source(label))


def _problem_text(section: str, error: ErrorDetails, layers: _Layers) -> str:
    if error["type"] == "config_field":
        key = str(error.get("ctx", {}).get("key", ""))
        return layers.origin(section, key).problem(section, key, error["msg"])
    key = str(error["loc"][0]) if error["loc"] else ""
    return layers.origin(section, key).problem(section, key, error_reason(error))


def _anchored(path: Path, base: Path | None) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base or Path.cwd()) / path


def _state_directory(env: Mapping[str, str]) -> Path | None:
    """systemd's $STATE_DIRECTORY; with several StateDirectory= entries, the first."""
    first = env.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(first) if first else None


def _resolve_paths(config: Config, env: Mapping[str, str], layers: _Layers) -> Config:
    store = config.store.model_copy(
        update={"path": _anchored(config.store.path, _state_directory(env))}
    )
    base = layers.origin("triggers", "automations").base
    automations = tuple(str(_anchored(Path(p), base)) for p in config.triggers.automations)
    triggers = config.triggers.model_copy(update={"automations": automations})
    server_update: dict[str, Path] = {}
    for key in ("tls_cert", "tls_key"):
        value = getattr(config.server, key)
        if value is None:
            continue
        source = layers.origin("server", key)
        resolved = _anchored(value, source.base)
        if not resolved.is_file():
            layers.problems.append(source.problem("server", key, f"no such file {str(resolved)!r}"))
        server_update[key] = resolved
    server = config.server.model_copy(update=server_update)
    return config.model_copy(update={"store": store, "triggers": triggers, "server": server})


def load_config(path: Path | None, env: Mapping[str, str], overrides: Mapping[str, Any]) -> Config:
    """The effective configuration: flags > env > file > defaults, paths made absolute.

    `overrides` takes the CLI flags `listen`, `db` and `automations` (None: not given) or
    `section.key` names. Raises ConfigError listing every problem of every source.
    """
    layers = _Layers()
    if path is not None:
        _read_file(path, layers)
    _read_env(env, layers)
    _read_overrides(overrides, layers)
    sections: dict[str, Section] = {}
    for name, model in SECTIONS.items():
        try:
            sections[name] = model.model_validate(layers.values[name])
        except ValidationError as exc:
            layers.problems.extend(_problem_text(name, e, layers) for e in exc.errors())
    if layers.problems:
        raise ConfigError(layers.problems)
    config = _resolve_paths(Config.model_validate(sections), env, layers)
    if layers.problems:
        raise ConfigError(layers.problems)
    return config
