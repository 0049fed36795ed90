"""The actions an automation can take, and the checks on their templates
(docs/DELIVERY.md#templates).

trigd supports two actions (docs/TRIGGERS.md#where-trigd-differs-from-prefect): `call-webhook`,
which carries its url, method, headers, payload template, secret and timeout inline instead of
naming a Prefect block, and `do-nothing`. Any other type is a validation error that names it and
lists these. Templates are parsed when the automation is loaded, so a broken one is a load error
rather than a failed delivery at 3 a.m.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
)

from daemon.core.references import UnresolvedReference, resolve

if TYPE_CHECKING:
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEMPLATE_LOOPS: Final = 10
MAX_TEMPLATE_LOOP_DEPTH: Final = 2


@functools.cache
def _template_environment() -> ImmutableSandboxedEnvironment:
    """Made on first use: jinja2 (a few MB) is imported only when an automation has a
    template (docs/PERFORMANCE.md#memory)."""
    from jinja2 import ChainableUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=ChainableUndefined)


def maybe_template(text: str) -> bool:
    """Only strings containing `{{` or `{%` are templates; others are sent verbatim."""
    return "{{" in text or "{%" in text


def _loop_depth(node: nodes.Node, depth: int = 0) -> int:
    from jinja2 import nodes

    if isinstance(node, nodes.For):
        depth += 1
    return max((_loop_depth(child, depth) for child in node.iter_child_nodes()), default=depth)


@functools.lru_cache(maxsize=256)  # templates checked already: each delivery revalidates
def validate_user_template(template: str) -> None:
    """Syntax plus Prefect's loop limits, checked when the automation is loaded so a bad
    template is a load error rather than a failed delivery. Raises ValueError."""
    from jinja2 import TemplateSyntaxError, nodes

    try:
        root = _template_environment().parse(template)
    except TemplateSyntaxError as exc:
        raise ValueError(f"'payload' is not a valid template: {exc}") from None
    loops = list(root.find_all(nodes.For))
    if len(loops) > MAX_TEMPLATE_LOOPS:
        raise ValueError(
            f"'payload' is not a valid template: Contains {len(loops)} for loops. "
            f"Templates can contain no more than {MAX_TEMPLATE_LOOPS} for loops."
        )
    depth = _loop_depth(root)
    if depth > MAX_TEMPLATE_LOOP_DEPTH:
        raise ValueError(
            f"'payload' is not a valid template: Contains nested for loops at a depth of "
            f"{depth}. Templates can nest for loops no more than {MAX_TEMPLATE_LOOP_DEPTH} "
            "loops deep."
        )


def _payload_as_string(value: Any) -> Any:
    """An object payload becomes 2-space-indented JSON, as Prefect's server does."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False)


def _check_payload(value: str) -> str:
    if maybe_template(value):
        validate_user_template(value)
    return value


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an absolute http:// or https:// URL")
    return value


REFUSED_HEADERS: Final = MappingProxyType(
    {
        "content-length": "trigd's HTTP client frames the body itself",
        "transfer-encoding": "trigd's HTTP client frames the body itself",
        "te": "trigd's HTTP client frames the body itself",
        "trailer": "trigd's HTTP client frames the body itself",
        "host": "trigd's HTTP client sets it from the url",
        "connection": "trigd's HTTP client manages its connections",
        "keep-alive": "trigd's HTTP client manages its connections",
        "upgrade": "trigd's HTTP client manages its connections",
        "webhook-id": "trigd sets it to sign the request",
        "webhook-timestamp": "trigd sets it to sign the request",
        "webhook-signature": "trigd sets it to sign the request",
    }
)
"""Headers an automation may not set (lower case), and why: each would break the request
or its signature. `Proxy-*` headers are refused too: trigd talks to endpoints directly."""

_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header name is an HTTP token (RFC 9110 §5.1)."""
_HEADER_VALUE: Final = re.compile(r"[\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?")
"""Printable ASCII, spaces and tabs inside only: no CR, LF or NUL (which would split the
request), nothing the HTTP client cannot encode, no edge whitespace it would refuse."""


def header_name_problem(name: str) -> str | None:
    """Why `name` cannot be an automation's header, or None."""
    if not _HEADER_NAME.fullmatch(name):
        return (
            f"header {name!r} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
        )
    lowered = name.lower()
    why = REFUSED_HEADERS.get(lowered)
    if why is None and lowered.startswith("proxy-"):
        why = "trigd does not use a proxy"
    return None if why is None else f"header {name!r} cannot be set by an automation: {why}"


HEADER_VALUE_RULE: Final = (
    "printable ASCII, without CR, LF, NUL or other control characters and without leading "
    "or trailing whitespace"
)


def header_value_problem(name: str) -> str:
    """The complaint about a bad value, naming the header but never the value (a secret)."""
    return f"header {name!r}: the value must be {HEADER_VALUE_RULE}"


def valid_header_value(value: str) -> bool:
    return _HEADER_VALUE.fullmatch(value) is not None


def _check_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    problems = []
    for name, value in headers.items():
        if (problem := header_name_problem(name)) is not None:
            problems.append(problem)
        elif not valid_header_value(value):
            problems.append(header_value_problem(name))
    if problems:
        raise ValueError("; ".join(problems))
    return headers


REDACTED: Final = "********"
"""What a secret or header value becomes in every document trigd sends, renders or stores
beside the action (as Prefect's `obfuscate` shows secrets)."""


def redacted_url(url: str) -> str:
    """`scheme://host[:port]`, then `/********` when the url had a path or query, without
    user info: enough to tell endpoints apart, nothing a token could hide in."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    where = f"{parts.scheme}://{host}" + ("" if parts.port is None else f":{parts.port}")
    rest = parts.path not in ("", "/") or parts.query or parts.fragment
    return f"{where}/{REDACTED}" if rest else f"{where}/"


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


class CallWebhook(BaseModel):
    """POST (or other method) the rendered `payload`, or the TriggeredAction JSON when
    the payload is empty, to `url`; signed with Standard Webhooks when `secret` is set.
    Validation errors never show the input: it may hold the secret or a header value."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    type: Literal["call-webhook"] = "call-webhook"
    url: Annotated[str, AfterValidator(_check_url)]
    method: Annotated[Literal["GET", "POST", "PUT", "PATCH", "DELETE"], BeforeValidator(_upper)] = (
        "POST"
    )
    headers: Annotated[dict[str, str], AfterValidator(_check_headers)] = Field(default_factory=dict)
    payload: Annotated[str, BeforeValidator(_payload_as_string), AfterValidator(_check_payload)] = (
        ""
    )
    secret: str | None = None
    timeout: float | None = Field(default=None, gt=0)
    """Seconds; None means the sender's default."""

    def redacted(self) -> CallWebhook:
        """This action as documents show it: same keys, no secret, no header value, and of
        the url only where it goes (a path or query may carry a token)."""
        return self.model_copy(
            update={
                "url": redacted_url(self.url),
                "headers": dict.fromkeys(self.headers, REDACTED),
                "secret": None if self.secret is None else REDACTED,
            }
        )


class ResolvedWebhook(NamedTuple):
    """What the sender sends with: the action's headers and secret, references resolved."""

    headers: dict[str, str]
    secret: str | None


class UnresolvedReferences(ValueError):
    """Every reference of one action that cannot be used, one problem per field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


def resolve_webhook(action: CallWebhook, environ: Mapping[str, str]) -> ResolvedWebhook:
    """The action's headers and secret with `env:`/`file:`/`credential:` references
    resolved (`daemon.core.references`), each header value checked again once resolved.
    UnresolvedReferences names each field and reference that fails, never a value."""
    problems: list[str] = []
    headers: dict[str, str] = {}
    for name, written in action.headers.items():
        try:
            value = resolve(written, environ)
        except UnresolvedReference as exc:
            problems.append(f"headers.{name}: {exc}")
            continue
        if not valid_header_value(value):  # a literal was checked already; a resolved one not
            problems.append(
                f"headers.{name}: the value {written!r} resolves to must be {HEADER_VALUE_RULE}"
            )
        headers[name] = value
    secret = action.secret
    if secret is not None:
        try:
            secret = resolve(secret, environ)
        except UnresolvedReference as exc:
            problems.append(f"secret: {exc}")
    if problems:
        raise UnresolvedReferences(problems)
    return ResolvedWebhook(headers, secret)


class DoNothing(BaseModel):
    """Records that the automation fired and nothing else."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["do-nothing"] = "do-nothing"

    def redacted(self) -> DoNothing:
        return self


ActionTypes = CallWebhook | DoNothing
ACTION_TYPES: Final = ("call-webhook", "do-nothing")


def _action_tag(value: Any) -> str | None:
    tag = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return tag if isinstance(tag, str) else None


def _check_action_type(value: Any) -> Any:
    if isinstance(value, CallWebhook | DoNothing):
        return value
    if not isinstance(value, dict):
        raise ValueError("an action must be an object")
    supported = ", ".join(repr(t) for t in ACTION_TYPES)
    if "type" not in value:
        raise ValueError(f"an action needs a type; supported types: {supported}")
    if value["type"] not in ACTION_TYPES:
        raise ValueError(f"unsupported action type {value['type']!r}; supported types: {supported}")
    return value


AnyAction = Annotated[
    Annotated[CallWebhook, Tag("call-webhook")] | Annotated[DoNothing, Tag("do-nothing")],
    Discriminator(_action_tag),
    BeforeValidator(_check_action_type),
]
