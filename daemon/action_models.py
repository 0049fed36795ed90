"""The actions an automation can take, and the checks on their templates (SEMANTICS §7.3).

trigd supports two actions (SEMANTICS §0): `call-webhook`, which carries its url, method,
headers, payload template, secret and timeout inline instead of naming a Prefect block,
and `do-nothing`. Any other type is a validation error that names it and lists these.
Templates are parsed when the automation is loaded, so a broken one is a load error
rather than a failed delivery at 3 a.m.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import jinja2
from jinja2 import ChainableUndefined, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
)

MAX_TEMPLATE_LOOPS: Final = 10
MAX_TEMPLATE_LOOP_DEPTH: Final = 2


_TEMPLATE_ENVIRONMENT: Final = ImmutableSandboxedEnvironment(undefined=ChainableUndefined)


def maybe_template(text: str) -> bool:
    """Only strings containing `{{` or `{%` are templates; others are sent verbatim."""
    return "{{" in text or "{%" in text


def _loop_depth(node: nodes.Node, depth: int = 0) -> int:
    if isinstance(node, nodes.For):
        depth += 1
    return max((_loop_depth(child, depth) for child in node.iter_child_nodes()), default=depth)


@functools.lru_cache(maxsize=256)  # templates checked already: each delivery revalidates
def validate_user_template(template: str) -> None:
    """Syntax plus Prefect's loop limits, checked when the automation is loaded so a bad
    template is a load error rather than a failed delivery. Raises ValueError."""
    try:
        root = _TEMPLATE_ENVIRONMENT.parse(template)
    except jinja2.TemplateSyntaxError as exc:
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


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


class CallWebhook(BaseModel):
    """POST (or other method) the rendered `payload`, or the TriggeredAction JSON when
    the payload is empty, to `url`; signed with Standard Webhooks when `secret` is set."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["call-webhook"] = "call-webhook"
    url: Annotated[str, AfterValidator(_check_url)]
    method: Annotated[Literal["GET", "POST", "PUT", "PATCH", "DELETE"], BeforeValidator(_upper)] = (
        "POST"
    )
    headers: dict[str, str] = Field(default_factory=dict)
    payload: Annotated[str, BeforeValidator(_payload_as_string), AfterValidator(_check_payload)] = (
        ""
    )
    secret: str | None = None
    timeout: float | None = Field(default=None, gt=0)
    """Seconds; None means the sender's default."""


class DoNothing(BaseModel):
    """Records that the automation fired and nothing else."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["do-nothing"] = "do-nothing"


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
