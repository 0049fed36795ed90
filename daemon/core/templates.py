"""The body of a webhook: the action's payload template, rendered (docs/DELIVERY.md#templates).

A payload is a template only if it contains `{{` or `{%`; anything else is sent verbatim,
and an empty payload sends the TriggeredAction JSON. Neither can carry a secret: the default
body is the document `redacted()`, and templates see the automation redacted, so no
endpoint learns another action's (or its own) secret, header values or url path.

Templates come from automation files, which an edge operator may not fully control, so
they run in Jinja's immutable sandbox with `range()` capped and Prefect's loop limits
(checked when the automation is loaded, by `daemon.core.action_models.validate_user_template`).
Missing attributes render as empty strings (`ChainableUndefined`), as in Prefect. Any
failure while rendering is a `RenderFailed`, which makes the delivery dead: a template that
fails once fails on every retry.

`trigd check` trial-renders every payload against a sample event (`trial_render`), with
undefined names and attributes as errors instead (docs/DELIVERY.md#templates); deliveries
keep `ChainableUndefined`.

Not carried over from Prefect: the humanize extension, the `ui_url` family of filters and
the lazily fetched `flow_run`, `deployment`, ... variables, which need a Prefect API.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from pydantic_core import to_jsonable_python

from daemon.core.action_models import CallWebhook, maybe_template, resolve_webhook
from daemon.core.events import LabelDiver, Resource
from daemon.core.firings import TriggeredAction

if TYPE_CHECKING:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEMPLATE_RANGE: Final = 100
"""Items `range()` may produce inside a template."""


class RenderFailed(Exception):
    """The template raised while rendering; `reason` is what the failed event reports."""

    def __init__(self, error: BaseException, source: str) -> None:
        self.reason = f"Template rendering failed: {error!r}"
        self.template_error = repr(error)
        self.template_source = source
        super().__init__(self.reason)


def _capped_range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_TEMPLATE_RANGE:
        raise OverflowError(
            f"Range too big. The sandbox blocks ranges larger than {MAX_TEMPLATE_RANGE}."
        )
    return numbers


def _jsonable(value: Any) -> Any:
    if isinstance(value, LabelDiver):
        return dict(iter(value))
    from jinja2 import Undefined  # loaded already: only templates reach here

    if isinstance(value, Undefined):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return to_jsonable_python(value, fallback=str)


def tojson(value: Any, indent: int | None = None) -> str:
    """JSON for anything a template can reach: pydantic models as their JSON form,
    label divers as objects, undefined as null. No HTML escaping: bodies are not HTML."""
    return json.dumps(_jsonable(value), indent=indent, ensure_ascii=False)


def _environment(undefined: type[jinja2.Undefined] | None = None) -> ImmutableSandboxedEnvironment:
    """jinja2 (a few MB) is imported here, when a payload is a template, not when trigd
    starts (docs/PERFORMANCE.md#memory)."""
    from jinja2 import ChainableUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        undefined=ChainableUndefined if undefined is None else undefined, autoescape=False
    )
    env.globals["range"] = _capped_range
    env.filters["tojson"] = tojson
    return env


@functools.cache
def _delivery_environment() -> ImmutableSandboxedEnvironment:
    return _environment()


COMPILED_TEMPLATES: Final = 256  # distinct payload templates kept compiled


@functools.lru_cache(maxsize=COMPILED_TEMPLATES)
def _compiled(source: str) -> jinja2.Template:
    """A template compiled once: every delivery of an action renders the same source, and
    compiling costs far more than rendering. A source that fails to compile is not kept."""
    return _delivery_environment().from_string(source)


def template_context(triggered: TriggeredAction) -> dict[str, Any]:
    """What a payload template can use, named as in Prefect."""
    return {
        "automation": triggered.automation.redacted(),
        "event": triggered.triggering_event,
        "labels": LabelDiver(triggered.triggering_labels),
        "firing": triggered.firing,
        "firings": list(triggered.all_firings()),
        "events": list(triggered.all_events()),
    }


def render_template(source: str, context: Mapping[str, Any]) -> str:
    """Render one user template (verbatim when it is not one); RenderFailed on error."""
    if not maybe_template(source):
        return source
    try:
        return _compiled(source).render(context)
    except Exception as exc:  # any error a user template can raise, sandbox ones included
        raise RenderFailed(exc, source) from exc


def webhook_body(triggered: TriggeredAction) -> str:
    """The rendered payload, or the TriggeredAction JSON when the action has none."""
    action = triggered.action
    if not isinstance(action, CallWebhook):
        raise TypeError(f"{action.type!r} actions have no webhook body")
    if not action.payload:
        return triggered.redacted().model_dump_json()
    return render_template(action.payload, template_context(triggered))


class WebhookRequest(NamedTuple):
    """What one attempt sends: the body, and the action's own headers and secret."""

    body: str
    headers: dict[str, str]
    secret: str | None


def webhook_request(triggered: TriggeredAction, environ: Mapping[str, str]) -> WebhookRequest:
    """The body, and the headers and secret with their references resolved in `environ`
    (the stored document holds references, never their values). RenderFailed, or
    UnresolvedReferences naming the fields."""
    action = triggered.action
    if not isinstance(action, CallWebhook):
        raise TypeError(f"{action.type!r} actions have no webhook request")
    body = webhook_body(triggered)
    headers, secret = resolve_webhook(action, environ)
    return WebhookRequest(body, headers, secret)


class _TrialKit(NamedTuple):
    environments: Mapping[bool, ImmutableSandboxedEnvironment]  # by `sample`
    unknown: type[Exception]  # raised when the sample cannot know a value


@functools.cache
def _trial_kit() -> _TrialKit:
    """The trial's environments and the undefined types behind them, made on the first
    trial (they subclass jinja2's, which is imported only when a template exists)."""
    import jinja2
    from jinja2 import ChainableUndefined

    class _UnknownSampleData(jinja2.UndefinedError):
        """The trial reached data the built-in sample cannot know (a payload key, a label)."""

    class _StrictTrialUndefined(ChainableUndefined):
        """An undefined that fails when used, not only when printed: `evnt.id`, `event.ocurred`
        and `automation.nmae` are errors. `is defined` and `default(...)` still work."""

        __slots__ = ()
        open_types: tuple[type, ...] = ()
        """Containers whose missing keys the sample cannot know: tolerated as at delivery."""

        def _is_open(self) -> bool:
            obj = self._undefined_obj
            return isinstance(obj, self.open_types) or (
                isinstance(obj, _StrictTrialUndefined) and obj._is_open()
            )

        def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> Any:
            if self._is_open():
                raise _UnknownSampleData(self._undefined_message)
            return super()._fail_with_undefined_error(*args, **kwargs)

        def _strict(self, *args: Any, **kwargs: Any) -> Any:
            if self._is_open():
                return ChainableUndefined.__str__(self)
            return self._fail_with_undefined_error()

        def __getattr__(self, name: str) -> Any:
            if name[:2] == "__" or not self._is_open():
                return self._fail_with_undefined_error()
            return self

        def __getitem__(self, name: Any) -> Any:
            return self.__getattr__(str(name))

        __str__ = _strict
        # Undefined binds its operators to its own method; these go through ours.
        __add__ = __radd__ = __sub__ = __rsub__ = _fail_with_undefined_error
        __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _fail_with_undefined_error
        __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _fail_with_undefined_error
        __pos__ = __neg__ = __call__ = __pow__ = __rpow__ = _fail_with_undefined_error
        __lt__ = __le__ = __gt__ = __ge__ = _fail_with_undefined_error
        __int__ = __float__ = __complex__ = _fail_with_undefined_error

        def __iter__(self) -> Any:
            if self._is_open():
                return iter(())
            return self._fail_with_undefined_error()

        def __bool__(self) -> bool:
            if self._is_open():
                return False
            return bool(self._fail_with_undefined_error())

        def __len__(self) -> int:
            if self._is_open():
                return 0
            return int(self._fail_with_undefined_error())

    class _SampleTrialUndefined(_StrictTrialUndefined):
        __slots__ = ()
        open_types = (dict, list, LabelDiver, Resource)

    def _trial_tojson(value: Any, indent: int | None = None) -> str:
        if isinstance(value, _StrictTrialUndefined):
            str(value)  # an error unless the sample cannot know it
        return tojson(value, indent)

    def _trial_environment(undefined: type[_StrictTrialUndefined]) -> ImmutableSandboxedEnvironment:
        env = _environment(undefined)
        env.filters["tojson"] = _trial_tojson
        return env

    return _TrialKit(
        MappingProxyType(
            {
                True: _trial_environment(_SampleTrialUndefined),
                False: _trial_environment(_StrictTrialUndefined),
            }
        ),
        _UnknownSampleData,
    )


def trial_render(source: str, triggered: TriggeredAction, *, sample: bool) -> str | None:
    """Render `source` for `triggered` as a delivery would, but with undefined names and
    attributes as errors: None when it renders, else the template error. With `sample`
    (the built-in sample event), keys of the event's payload, resources and labels, which
    the sample cannot know, render as at delivery (empty) and end the trial without error;
    with the user's own event every name must resolve."""
    if not maybe_template(source):
        return None
    kit = _trial_kit()
    try:
        kit.environments[sample].from_string(source).render(template_context(triggered))
    except kit.unknown:
        return None
    except Exception as exc:  # any error a user template can raise, sandbox ones included
        return f"{type(exc).__name__}: {exc}"
    return None
