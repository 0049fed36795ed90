"""The `[upstream]` section of daemon/core/config.py: its defaults, and every bad value named
with its key and why."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from daemon.core.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trigd.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env or {}, {})
    return str(caught.value)


def test_defaults_are_off() -> None:
    upstream = load_config(None, {}, {}).upstream
    assert (upstream.url, upstream.forward, upstream.subscribe) == ("", True, {})
    assert upstream.backlog == timedelta(days=7)
    assert not upstream.forwarding
    assert not upstream.subscribing


def test_a_toml_table_filter_and_an_env_json_filter(tmp_path: Path) -> None:
    text = (
        '[upstream]\nurl = "https://prefect.example:4200/api/"\nauth_string = "env:PREFECT_AUTH"\n'
        'subscribe = {event = {prefix = ["prefect.flow-run."]}, resource = {id_prefix = ["x"]}}\n'
    )
    upstream = load_config(write(tmp_path, text), {}, {}).upstream
    assert upstream.url == "https://prefect.example:4200/api"
    assert upstream.subscribe == {
        "event": {"prefix": ["prefect.flow-run."]},
        "resource": {"id_prefix": ["x"]},
    }
    assert upstream.forwarding
    assert upstream.subscribing
    env = {"TRIGD_UPSTREAM_SUBSCRIBE": '{"related": [{"role": ["flow"]}]}'}
    from_env = load_config(write(tmp_path, text), env, {}).upstream
    assert from_env.subscribe == {"related": [{"role": ["flow"]}]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('url = "ftp://prefect/api"', "[upstream] url: expected an http(s) URL"),
        ('url = "http://user:pw@prefect/api"', "[upstream] url: credentials go in auth_string"),
        ('url = "http://prefect/api?x=1"', "[upstream] url: the API URL takes no query"),
        ("subscribe = [1]", "[upstream] subscribe: expected an EventFilter table"),
        (
            "subscribe = {occurred = {since = 1}}",
            "[upstream] subscribe: unknown EventFilter key 'occurred' (trigd sets it",
        ),
        ("subscribe = {evnt = {}}", "[upstream] subscribe: unknown EventFilter key 'evnt'"),
        ('subscribe = {event = "x"}', "[upstream] subscribe: event: expected a table"),
        ('backlog = "0s"', "[upstream] backlog: must be longer than 0s"),
        ("page_events = 0", "[upstream] page_events: must be at least 1"),
        ("forward = 3", "[upstream] forward:"),
        (
            'auth_string = "a"\napi_key = "b"',
            "[upstream] api_key: set auth_string (a self-hosted server) or api_key",
        ),
        ("urll = 1", "[upstream] unknown key 'urll' (did you mean 'url'?)"),
    ],
)
def test_bad_values_name_the_key_and_why(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in problems(tmp_path, f"[upstream]\n{text}\n")


def test_a_bad_json_filter_from_the_environment(tmp_path: Path) -> None:
    message = problems(tmp_path, "", {"TRIGD_UPSTREAM_SUBSCRIBE": "{nope"})
    assert "TRIGD_UPSTREAM_SUBSCRIBE: [upstream] subscribe: not a JSON object" in message


def test_credentials_stay_out_of_repr_and_errors(tmp_path: Path) -> None:
    text = '[upstream]\nauth_string = "hunter2-auth"\napi_key = "hunter2-key"\n'
    message = problems(tmp_path, text)
    assert "hunter2" not in message
    config = load_config(write(tmp_path, '[upstream]\napi_key = "hunter2-key"\n'), {}, {})
    assert "hunter2" not in repr(config)
