"""Configuration (docs/OPERATIONS.md#configuration) and durations: defaults, precedence, every bad
input named."""

from __future__ import annotations

import json
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from daemon.core.config import SECTIONS, Config, ConfigError, load_config
from daemon.core.durations import format_duration, parse_duration
from tests.support.paths import REPO

EXAMPLE = REPO / "packaging" / "trigd.toml"


def write(tmp_path: Path, text: str, name: str = "trigd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path | None, env: dict[str, str], overrides: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env, overrides)
    return str(caught.value)


# --- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("7d", timedelta(days=7)),
        ("500ms", timedelta(milliseconds=500)),
        ("1d2h3m4s5ms", timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=5)),
        ("1.5h", timedelta(minutes=90)),
        (" 1h 30m ", timedelta(minutes=90)),
        ("2w", timedelta(days=14)),
        ("250us", timedelta(microseconds=250)),
        ("0s", timedelta(0)),
        ("90", timedelta(seconds=90)),
        ("0.25", timedelta(milliseconds=250)),
        (90, timedelta(seconds=90)),
        (0.5, timedelta(milliseconds=500)),
        ("PT15M", timedelta(minutes=15)),
        ("P1DT2H", timedelta(days=1, hours=2)),
        ("pt0.5s", timedelta(milliseconds=500)),
        ("P1W", timedelta(days=7)),
    ],
)
def test_parse_duration_accepts(text: str | int | float, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert type(parse_duration(text)) is timedelta  # not pendulum's subclass


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("-5s", "cannot be negative"),
        (-1, "cannot be negative"),
        ("", "empty"),
        ("abc", "such as '90s', '15m' or '1h30m'"),
        ("1h30", "such as '90s'"),
        ("5 minutes", "such as '90s'"),
        ("30m1h", "largest to smallest"),
        ("1m1m", "largest to smallest"),
        ("1e5", "such as '90s'"),
        ("P1Y", "no fixed length"),
        ("P2M", "no fixed length"),
        ("PT", "ISO-8601"),
        ("2020-01-01", "such as '90s'"),
        ("99999999999999d", "too long"),
        (float("nan"), "such as '90s'"),
        (float("inf"), "such as '90s'"),
        (True, "such as '90s'"),
    ],
)
def test_parse_duration_rejects(value: Any, why: str) -> None:
    with pytest.raises(ValueError, match=r"duration|years") as caught:
        parse_duration(value)
    assert why in str(caught.value)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(days=3), "3d"),
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(microseconds=7), "7us"),
        (timedelta(seconds=1, milliseconds=500), "1.5s"),
        (timedelta(seconds=-5), "-5s"),
    ],
)
def test_format_duration(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@settings(max_examples=200, deadline=None)
@given(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=10_000)))
def test_format_then_parse_round_trips(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value


# --- defaults and the example file ---------------------------------------------------------


def test_defaults_are_spec_section_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {}, {})
    assert config.server.listen == "127.0.0.1:4280"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 4280)
    assert config.server.auth_token == ""
    assert config.server.tls_cert is None
    assert config.server.tls_key is None
    assert config.server.max_event_bytes == 1_500_000
    assert config.server.max_json_depth == 64
    assert config.store.path == tmp_path / "trigd.db"
    assert config.store.synchronous == "full"
    assert config.store.event_retention == timedelta(days=7)
    assert config.store.commit_linger == timedelta(milliseconds=5)
    assert config.store.commit_linger_events == 64
    assert config.store.inbox_pump_delay == timedelta(milliseconds=20)
    assert config.store.page_cache_mib == 2
    assert config.store.wal_checkpoint_pages == 4_000
    assert config.store.wal_max_pages == 16_000
    assert config.ordering.preceding_event_lookback == timedelta(minutes=15)
    assert config.ordering.seen_expiration == timedelta(hours=1)
    assert config.ordering.max_depth == 20
    assert config.triggers.automations == ()
    assert config.triggers.proactive_granularity == timedelta(seconds=5)
    assert config.triggers.expired_bucket_buffer == timedelta(seconds=60)
    assert config.delivery.timeout == timedelta(seconds=15)
    assert config.delivery.max_age == timedelta(hours=72)
    assert config.delivery.concurrency == 8
    assert config.delivery.per_endpoint_concurrency == 2
    assert config.delivery.probe_concurrency == 2
    assert config.delivery.lease == timedelta(seconds=60)


def test_example_file_lists_every_key_with_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys whose default follows another key are shown commented out, so that editing that
    other key alone works; uncommented they hold the same defaults."""
    monkeypatch.chdir(tmp_path)
    text = EXAMPLE.read_text(encoding="utf-8")
    commented = re.findall(r"^# ([a-z_]+ = .*)$", text, flags=re.MULTILINE)
    assert [line.split(" =")[0] for line in commented] == [
        "per_endpoint_concurrency",
        "max_per_endpoint",
        "probe_concurrency",
        "lease",
        "concurrency_while_ingesting",
    ]
    uncommented = write(tmp_path, re.sub(r"^# ([a-z_]+ = )", r"\1", text, flags=re.MULTILINE))
    with uncommented.open("rb") as handle:
        document = tomllib.load(handle)
    assert {s: set(t) for s, t in document.items()} == {
        name: set(model.model_fields) for name, model in SECTIONS.items()
    }
    assert load_config(EXAMPLE, {}, {}) == load_config(None, {}, {})
    assert load_config(uncommented, {}, {}) == load_config(None, {}, {})


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(ValidationError):
        config.server.listen = "0.0.0.0:1"  # type: ignore[misc]


def test_auth_token_stays_out_of_repr(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[server]\nauth_token = "s3cret"\n'), {}, {})
    assert config.server.auth_token == "s3cret"
    assert "s3cret" not in repr(config)


# --- unknown names -------------------------------------------------------------------------


def test_unknown_key_is_named_with_file_and_section(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlissen = "0.0.0.0:80"\n')
    message = problems_of(path, {}, {})
    assert message == f"{path}: [server] unknown key 'lissen' (did you mean 'listen'?)"


def test_unknown_section_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, '[servers]\nlisten = "0.0.0.0:80"\n[webhooks]\nx = 1\n')
    message = problems_of(path, {}, {})
    assert f"{path}: unknown section [servers] (did you mean 'server'?)" in message
    assert f"{path}: unknown section [webhooks]" in message


def test_key_outside_any_section_points_at_its_section(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = "0.0.0.0:80"\n')
    message = problems_of(path, {}, {})
    assert message == f"{path}: unknown key 'listen' outside any section (it belongs in [server])"


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    message = problems_of(write(tmp_path, 'store = "x.db"\n'), {}, {})
    assert "[store] must be a table" in message


def test_unknown_trigd_environment_variables_are_errors() -> None:
    message = problems_of(None, {"TRIGD_SERVER_LISEN": "x", "TRIGD_LOGLEVEL": "debug"}, {})
    assert "TRIGD_SERVER_LISEN: unknown environment variable: [server] has no key 'lisen'" in (
        message
    )
    assert "TRIGD_LOGLEVEL: unknown environment variable" in message


def test_client_and_foreign_variables_are_ignored(tmp_path: Path) -> None:
    env = {"TRIGD_TOKEN": "t", "PATH": "/bin", "trigd_server_listen": "nonsense"}
    assert load_config(None, env, {}).server.listen == "127.0.0.1:4280"


# --- bad values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[server]\nlisten = "localhost"', "[server] listen: expected HOST:PORT"),
        ('[server]\nlisten = ":4280"', "[server] listen: no host"),
        ('[server]\nlisten = "1.2.3.4:70000"', "[server] listen: port must be 0..65535"),
        ('[server]\nlisten = "::1:4280"', "[server] listen: IPv6 addresses go in brackets"),
        ('[server]\nlisten = "[nope]:1"', "[server] listen: '[nope]' is not an IPv6"),
        ('[server]\nlisten = "bad host:1"', "[server] listen: 'bad host' is not a host"),
        # a label over 63 characters, a name over 253: not host names (the resolver's codec
        # would raise UnicodeError on the first)
        (f'[server]\nlisten = "a.{"b" * 64}:1"', "[server] listen: 'a.bbbb"),
        (f'[server]\nlisten = "{".".join(["a" * 60] * 5)}:1"', "[server] listen: 'aaaa"),
        ("[server]\nlisten = 4280", "[server] listen: expected HOST:PORT"),
        ("[server]\nmax_event_bytes = 0", "[server] max_event_bytes: must be at least 1"),
        ("[server]\nmax_event_bytes = 1.5", "[server] max_event_bytes: expected a whole number"),
        ("[server]\nmax_json_depth = 2", "[server] max_json_depth: must be 3..128, got 2 (an"),
        ("[server]\nmax_json_depth = 129", "[server] max_json_depth: must be 3..128, got 129"),
        ("[server]\nauth_token = 7", "[server] auth_token: Input should be a valid string"),
        ('[store]\nsynchronous = "off"', "[store] synchronous: Input should be 'full' or"),
        ('[store]\npath = ""', "[store] path: must not be empty"),
        ('[log]\nlevel = "verbose"', "[log] level: Input should be 'DEBUG', 'INFO', 'WARNING'"),
        ('[log]\nformat = "yaml"', "[log] format: Input should be 'text' or 'json'"),
        ('[store]\nevent_retention = "0s"', "[store] event_retention: must be longer than 0s"),
        (
            "[triggers]\nproactive_granularity = 0",
            "[triggers] proactive_granularity: must be longer than 0s, got 0s",
        ),
        ("[ordering]\nmax_depth = -1", "[ordering] max_depth: must be at least 1"),
        ("[ordering]\nmax_depth = true", "[ordering] max_depth: expected a whole number"),
        ('[ordering]\nseen_expiration = "-1h"', "[ordering] seen_expiration: a duration cannot"),
        ('[triggers]\nautomations = "a.yaml"', "[triggers] automations: expected a list"),
        ('[triggers]\nproactive_granularity = "5"', None),
        ('[delivery]\ntimeout = "soon"', "[delivery] timeout: expected a duration such as"),
        ('[delivery]\nlease = "10s"', "[delivery] lease: must be longer than timeout (15s)"),
        (
            "[delivery]\nper_endpoint_concurrency = 9",
            "[delivery] per_endpoint_concurrency: must not exceed concurrency (8)",
        ),
        (
            "[delivery]\nprobe_concurrency = 8",
            "[delivery] probe_concurrency: must be less than concurrency (8), so that failing "
            "endpoints leave a slot to the others, got 8",
        ),
        (
            "[delivery]\nconcurrency = 1\nprobe_concurrency = 2",
            "[delivery] probe_concurrency: must be 1 when concurrency is 1, got 2",
        ),
        ("[delivery]\nprobe_concurrency = 0", "[delivery] probe_concurrency: must be at least 1"),
        ('[server]\ntls_cert = "c.pem"', "[server] tls_key: tls_cert and tls_key must be set"),
        (
            '[store]\ncommit_linger = "2s"',
            "[store] commit_linger: must be at most 1s (every ack waits up to this long), got 2s",
        ),
        ('[store]\ncommit_linger = "-1ms"', "[store] commit_linger: a duration cannot be"),
        ('[store]\ncommit_linger = "0s"', None),
        ("[store]\ncommit_linger_events = 0", "[store] commit_linger_events: must be at least 1"),
        (
            '[store]\ninbox_pump_delay = "2s"',
            "[store] inbox_pump_delay: must be at most 1s (with no client events, trigd's own "
            "events wait this long), got 2s",
        ),
        ('[store]\ninbox_pump_delay = "-1ms"', "[store] inbox_pump_delay: a duration cannot be"),
        ('[store]\ninbox_pump_delay = "0s"', None),
        ("[store]\npage_cache_mib = 0", "[store] page_cache_mib: must be at least 1"),
        (
            "[store]\nwal_max_pages = 4000",
            "[store] wal_max_pages: must be larger than wal_checkpoint_pages (4000), got 4000",
        ),
        ("[store]\nwal_checkpoint_pages = 0", "[store] wal_checkpoint_pages: must be at least 1"),
        ("[store]\nwal_checkpoint_pages = 100\nwal_max_pages = 101", None),
    ],
)
def test_bad_values_name_file_section_key_and_why(
    tmp_path: Path, toml: str, expected: str | None
) -> None:
    path = write(tmp_path, toml + "\n")
    if expected is None:
        load_config(path, {}, {})
        return
    message = problems_of(path, {}, {})
    assert message.startswith(f"{path}: {expected}"), message


# --- [delivery] extensions that follow timeout and concurrency ------------------------------


@pytest.mark.parametrize(
    ("timeout", "lease"),
    [("60s", 90), (90, 120), ("2m", 150), ("30s", 60), ("1s", 60)],
)
@pytest.mark.parametrize("source", ["file", "env"])
def test_any_timeout_alone_is_accepted_with_a_lease_that_outlives_it(
    tmp_path: Path, source: str, timeout: str | int, lease: int
) -> None:
    """lease is an extension: unset, it follows timeout (timeout + 30s, at least 60s)."""
    if source == "file":
        config = load_config(
            write(tmp_path, f"[delivery]\ntimeout = {json.dumps(timeout)}\n"), {}, {}
        )
    else:
        config = load_config(None, {"TRIGD_DELIVERY_TIMEOUT": str(timeout)}, {})
    assert config.delivery.lease == timedelta(seconds=lease)
    assert config.delivery.lease > config.delivery.timeout


@pytest.mark.parametrize(("concurrency", "per_endpoint"), [(1, 1), (2, 2), (3, 2), (8, 2)])
def test_any_concurrency_alone_is_accepted(
    tmp_path: Path, concurrency: int, per_endpoint: int
) -> None:
    path = write(tmp_path, f"[delivery]\nconcurrency = {concurrency}\n")
    config = load_config(path, {}, {})
    assert config.delivery.per_endpoint_concurrency == per_endpoint
    from_env = load_config(None, {"TRIGD_DELIVERY_CONCURRENCY": str(concurrency)}, {})
    assert from_env.delivery.per_endpoint_concurrency == per_endpoint


@pytest.mark.parametrize(("concurrency", "probes"), [(1, 1), (2, 1), (3, 2), (8, 2), (64, 2)])
def test_probe_concurrency_follows_concurrency_a_slot_short(
    tmp_path: Path, concurrency: int, probes: int
) -> None:
    """Failing endpoints leave a slot to the others whatever concurrency alone is set to."""
    path = write(tmp_path, f"[delivery]\nconcurrency = {concurrency}\n")
    assert load_config(path, {}, {}).delivery.probe_concurrency == probes
    from_env = load_config(None, {"TRIGD_DELIVERY_CONCURRENCY": str(concurrency)}, {})
    assert from_env.delivery.probe_concurrency == probes
    explicit = load_config(None, {"TRIGD_DELIVERY_PROBE_CONCURRENCY": "1"}, {})
    assert explicit.delivery.probe_concurrency == 1


def test_explicit_lease_and_per_endpoint_concurrency_are_kept(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[delivery]\ntimeout = "1m"\nlease = "5m"\nconcurrency = 1\nper_endpoint_concurrency = 1\n',
    )
    delivery = load_config(path, {}, {}).delivery
    assert (delivery.lease, delivery.per_endpoint_concurrency) == (timedelta(minutes=5), 1)


def test_explicit_conflicts_are_refused_naming_both_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[delivery]\ntimeout = "60s"\nlease = "60s"\nconcurrency = 1\n'
        "per_endpoint_concurrency = 2\n",
    )
    assert problems_of(path, {}, {}) == (
        f"{path}: [delivery] lease: must be longer than timeout (1m), got 1m"
    )
    path = write(tmp_path, "[delivery]\nconcurrency = 1\nper_endpoint_concurrency = 2\n")
    assert problems_of(path, {}, {}) == (
        f"{path}: [delivery] per_endpoint_concurrency: must not exceed concurrency (1), got 2"
    )
    # lease from the file, timeout from the environment: the file's lease is named
    path = write(tmp_path, '[delivery]\nlease = "90s"\n')
    message = problems_of(path, {"TRIGD_DELIVERY_TIMEOUT": "2m"}, {})
    assert message == f"{path}: [delivery] lease: must be longer than timeout (2m), got 1m30s"


def test_invalid_timeout_and_concurrency_are_named_not_the_keys_that_follow_them() -> None:
    env = {"TRIGD_DELIVERY_TIMEOUT": "soon", "TRIGD_DELIVERY_CONCURRENCY": "0"}
    assert problems_of(None, env, {}).splitlines() == [
        "TRIGD_DELIVERY_TIMEOUT: [delivery] timeout: expected a duration such as '90s', "
        "'15m' or '1h30m', got 'soon'",
        "TRIGD_DELIVERY_CONCURRENCY: [delivery] concurrency: must be at least 1, got 0",
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlissen = 1\n[store]\nsynchronous = "off"\n[bogus]\n')
    env = {"TRIGD_DELIVERY_CONCURRENCY": "many", "TRIGD_NOPE": "1"}
    with pytest.raises(ConfigError) as caught:
        load_config(path, env, {"listen": "nowhere"})
    assert len(caught.value.problems) == 6, caught.value.problems


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    broken = write(tmp_path, "[server\nlisten = 1\n")
    assert problems_of(broken, {}, {}).startswith(f"{broken}: not valid TOML: ")
    missing = tmp_path / "absent.toml"
    assert problems_of(missing, {}, {}) == f"{missing}: no such file"
    assert problems_of(tmp_path, {}, {}) == f"{tmp_path}: is a directory, not a TOML file"
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(b'[server]\nauth_token = "\xe9"\n')
    assert "not valid TOML" in problems_of(binary, {}, {})


# --- precedence ----------------------------------------------------------------------------


@pytest.mark.parametrize("in_file", [False, True])
@pytest.mark.parametrize("in_env", [False, True])
@pytest.mark.parametrize("in_flags", [False, True])
def test_flags_beat_env_beat_file_beat_defaults(
    tmp_path: Path, in_file: bool, in_env: bool, in_flags: bool
) -> None:
    path = write(tmp_path, '[server]\nlisten = "10.0.0.1:1"\n') if in_file else None
    env = {"TRIGD_SERVER_LISTEN": "10.0.0.2:2"} if in_env else {}
    flags = {"listen": "10.0.0.3:3"} if in_flags else {"listen": None}
    expected = (
        "10.0.0.3:3"
        if in_flags
        else "10.0.0.2:2"
        if in_env
        else "10.0.0.1:1"
        if in_file
        else "127.0.0.1:4280"
    )
    assert load_config(path, env, flags).server.listen == expected


def test_errors_name_the_source_that_set_the_value(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = "bad"\n[store]\nsynchronous = "off"\n')
    env = {"TRIGD_STORE_SYNCHRONOUS": "sometimes"}
    message = problems_of(path, env, {"listen": "also bad"})
    assert message.splitlines() == [
        "--listen: [server] listen: expected HOST:PORT such as '127.0.0.1:4280', got 'also bad'",
        "TRIGD_STORE_SYNCHRONOUS: [store] synchronous: Input should be 'full' or 'normal'",
    ]


def test_environment_values_are_parsed_from_strings(tmp_path: Path) -> None:
    env = {
        "TRIGD_SERVER_MAX_EVENT_BYTES": "2_000_000",
        "TRIGD_STORE_SYNCHRONOUS": "NORMAL",
        "TRIGD_ORDERING_SEEN_EXPIRATION": "2h",
        "TRIGD_ORDERING_PRECEDING_EVENT_LOOKBACK": "30",
        "TRIGD_TRIGGERS_AUTOMATIONS": "/etc/a.yaml, /etc/b/*.json",
        "TRIGD_DELIVERY_MAX_AGE": "PT1H",
    }
    config = load_config(None, env, {})
    assert config.server.max_event_bytes == 2_000_000
    assert config.store.synchronous == "normal"
    assert config.ordering.seen_expiration == timedelta(hours=2)
    assert config.ordering.preceding_event_lookback == timedelta(seconds=30)
    assert config.triggers.automations == ("/etc/a.yaml", "/etc/b/*.json")
    assert config.delivery.max_age == timedelta(hours=1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["/x/a,b.yaml", "/y.json"]', ("/x/a,b.yaml", "/y.json")),
        ("", ()),
        ("/one.yaml", ("/one.yaml",)),
    ],
)
def test_environment_lists_are_json_or_comma_separated(
    value: str, expected: tuple[str, ...]
) -> None:
    config = load_config(None, {"TRIGD_TRIGGERS_AUTOMATIONS": value}, {})
    assert config.triggers.automations == expected


def test_environment_list_with_broken_json_is_named() -> None:
    message = problems_of(None, {"TRIGD_TRIGGERS_AUTOMATIONS": '["a.yaml"'}, {})
    assert message.startswith(
        "TRIGD_TRIGGERS_AUTOMATIONS: [triggers] automations: not a valid JSON array"
    )


def test_flags_db_and_automations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, '[store]\npath = "file.db"\n[triggers]\nautomations = ["f.yaml"]\n')
    config = load_config(path, {}, {"db": "flag.db", "automations": ["g/*.yaml"]})
    assert config.store.path == tmp_path / "flag.db"
    assert config.triggers.automations == (str(tmp_path / "g/*.yaml"),)
    assert load_config(path, {}, {"automations": []}).triggers.automations == ()


def test_unknown_override_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown configuration override 'lisen'"):
        load_config(None, {}, {"lisen": "x"})
    assert load_config(None, {}, {"server.max_connections": 3}).server.max_connections == 3


# --- paths ---------------------------------------------------------------------------------


def test_store_path_under_state_directory(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": "/var/lib/trigd"}
    assert load_config(None, env, {}).store.path == Path("/var/lib/trigd/trigd.db")
    env["TRIGD_STORE_PATH"] = "sub/x.db"
    assert load_config(None, env, {}).store.path == Path("/var/lib/trigd/sub/x.db")
    env["TRIGD_STORE_PATH"] = "/srv/abs.db"
    assert load_config(None, env, {}).store.path == Path("/srv/abs.db")


def test_store_path_takes_the_first_of_several_state_directories() -> None:
    env = {"STATE_DIRECTORY": "/var/lib/trigd:/var/lib/other"}
    assert load_config(None, env, {}).store.path == Path("/var/lib/trigd/trigd.db")


def test_store_path_without_state_directory_is_under_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    path = write(config_dir, '[store]\npath = "data/t.db"\n')
    assert load_config(path, {"STATE_DIRECTORY": ""}, {}).store.path == tmp_path / "data/t.db"


def test_automation_globs_in_a_file_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(tmp_path, '[triggers]\nautomations = ["auto/*.yaml", "/abs/x.json"]\n')
    config = load_config(path, {}, {})
    assert config.triggers.automations == (str(tmp_path / "auto/*.yaml"), "/abs/x.json")
    from_env = load_config(path, {"TRIGD_TRIGGERS_AUTOMATIONS": "mine.yaml"}, {})
    assert from_env.triggers.automations == (str(elsewhere / "mine.yaml"),)


def test_tls_files_must_exist_and_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    path = write(tmp_path, '[server]\ntls_cert = "cert.pem"\ntls_key = "key.pem"\n')
    message = problems_of(path, {}, {})
    assert message == f"{path}: [server] tls_key: no such file '{tmp_path / 'key.pem'}'"
    (tmp_path / "key.pem").write_text("x")
    config = load_config(path, {}, {})
    assert (config.server.tls_cert, config.server.tls_key) == (
        tmp_path / "cert.pem",
        tmp_path / "key.pem",
    )


def test_durations_in_toml_accept_strings_and_numbers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[ordering]\npreceding_event_lookback = 90\nseen_expiration = "1h30m"\n'
        '[triggers]\nproactive_granularity = 0.5\nexpired_bucket_buffer = "PT2M"\n',
    )
    config = load_config(path, {}, {})
    assert config.ordering.preceding_event_lookback == timedelta(seconds=90)
    assert config.ordering.seen_expiration == timedelta(minutes=90)
    assert config.triggers.proactive_granularity == timedelta(milliseconds=500)
    assert config.triggers.expired_bucket_buffer == timedelta(minutes=2)
    dumped = config.model_dump(mode="json")
    assert dumped["ordering"]["seen_expiration"] == "1h30m"


def test_log_level_and_format_default_to_info_text_and_read_any_case(tmp_path: Path) -> None:
    assert (Config().log.level, Config().log.format) == ("INFO", "text")
    config = load_config(write(tmp_path, '[log]\nlevel = "debug"\nformat = "JSON"\n'), {}, {})
    assert (config.log.level, config.log.format) == ("DEBUG", "json")
    from_env = load_config(None, {"TRIGD_LOG_LEVEL": "warning", "TRIGD_LOG_FORMAT": "json"}, {})
    assert (from_env.log.level, from_env.log.format) == ("WARNING", "json")


def test_max_per_endpoint_follows_concurrency_unless_set(tmp_path: Path) -> None:
    assert Config().delivery.max_per_endpoint == 7  # concurrency 8, a slot left over
    wide = load_config(write(tmp_path, "[delivery]\nconcurrency = 100\n"), {}, {})
    assert wide.delivery.max_per_endpoint == 32
    one = load_config(write(tmp_path, "[delivery]\nconcurrency = 1\n"), {}, {})
    assert one.delivery.max_per_endpoint == 1
    fixed = load_config(
        write(tmp_path, "[delivery]\nconcurrency = 4\nmax_per_endpoint = 2\n"), {}, {}
    )
    assert fixed.delivery.max_per_endpoint == 2
    for bad in ("max_per_endpoint = 1", "max_per_endpoint = 9"):
        with pytest.raises(ConfigError, match=r"\[delivery\] max_per_endpoint: must be from"):
            load_config(write(tmp_path, f"[delivery]\n{bad}\n"), {}, {})


def test_deliveries_give_way_to_ingest_by_default(tmp_path: Path) -> None:
    """While clients send events, 2 deliveries in flight (fewer when concurrency is lower,
    so concurrency alone never fails), until 100 ms without an evaluator batch."""
    assert Config().delivery.concurrency_while_ingesting == 2
    assert Config().delivery.ingest_quiet_after == timedelta(milliseconds=100)
    one = load_config(write(tmp_path, "[delivery]\nconcurrency = 1\n"), {}, {})
    assert one.delivery.concurrency_while_ingesting == 1
    from_env = load_config(None, {"TRIGD_DELIVERY_CONCURRENCY": "1"}, {})
    assert from_env.delivery.concurrency_while_ingesting == 1
    set_both = load_config(
        write(
            tmp_path,
            "[delivery]\nconcurrency = 4\nconcurrency_while_ingesting = 4\n"
            'ingest_quiet_after = "250ms"\n',
        ),
        {},
        {},
    )
    assert set_both.delivery.concurrency_while_ingesting == 4
    assert set_both.delivery.ingest_quiet_after == timedelta(milliseconds=250)
    env = {"TRIGD_DELIVERY_CONCURRENCY_WHILE_INGESTING": "3"}
    assert load_config(None, env, {}).delivery.concurrency_while_ingesting == 3


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "concurrency_while_ingesting = 9",
            "[delivery] concurrency_while_ingesting: must not exceed concurrency (8), got 9",
        ),
        (
            "concurrency = 2\nconcurrency_while_ingesting = 3",
            "[delivery] concurrency_while_ingesting: must not exceed concurrency (2), got 3",
        ),
        (
            "concurrency_while_ingesting = 0",
            "[delivery] concurrency_while_ingesting: must be at least 1, got 0",
        ),
        (
            'ingest_quiet_after = "0s"',
            "[delivery] ingest_quiet_after: must be longer than 0s, got 0s",
        ),
        ('ingest_quiet_after = "soon"', "[delivery] ingest_quiet_after: expected a duration"),
    ],
)
def test_giving_way_settings_are_checked(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"[delivery]\n{text}\n"), {}, {})
    assert problem in str(caught.value)
