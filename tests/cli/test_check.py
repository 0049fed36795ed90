"""`trigd check` (docs/OPERATIONS.md#commands): one line per valid automation, or every problem
named."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from daemon.cli.check import check_command
from daemon.core.automations import automation_id_for
from tests.support.paths import REPO
from tests.support.samples import PUMP_YAML

REFERENCE = "reference: docs/AUTOMATIONS.md"
"""The last line of a successful check."""
SEE_REFERENCE = "see docs/AUTOMATIONS.md for what automation files may say"
"""The last line of a failed check."""

COMPOSITE_ID = UUID("9b2e3c1a-0d4f-4c55-8e6a-2f1b7c9d0e11")
COMPOSITE: dict[str, Any] = {
    "id": str(COMPOSITE_ID),
    "name": "door then silence",
    "enabled": False,
    "trigger": {
        "type": "sequence",
        "within": 300,
        "triggers": [
            {"posture": "Reactive", "expect": ["door.opened"]},
            {
                "type": "compound",
                "require": "any",
                "within": None,
                "triggers": [{"posture": "Proactive", "expect": ["door.closed"], "within": 30}],
            },
        ],
    },
    "actions": [{"type": "do-nothing"}],
    "actions_on_resolve": [{"type": "do-nothing"}],
}


def run(*paths: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = check_command([str(p) for p in paths], out, err)
    return code, out.getvalue(), err.getvalue()


def test_valid_yaml_prints_one_line_per_automation(tmp_path: Path) -> None:
    file = tmp_path / "pumps.yaml"
    file.write_text(PUMP_YAML)
    code, out, err = run(file)
    assert (code, err) == (0, "")
    burst_id = automation_id_for("pump pressure burst")
    assert out == (
        f"{file}: pump pressure burst ({burst_id}): event Reactive threshold 3 within 1m "
        "for_each prefect.resource.id expect pump.pressure.high, 1 action\n"
        f"{REFERENCE}\n"
    )


def test_valid_json_with_composite_triggers(tmp_path: Path) -> None:
    file = tmp_path / "doors.json"
    file.write_text(json.dumps(COMPOSITE))
    code, out, err = run(file)
    assert (code, err) == (0, "")
    assert out == (
        f"{file}: door then silence ({COMPOSITE_ID}): sequence of 2 within 5m "
        "[event Reactive threshold 1 within 0s expect door.opened; compound require any of 1 "
        "within unlimited [event Proactive threshold 1 within 30s expect door.closed]], "
        "1 action, 1 on resolve (disabled)\n"
        f"{REFERENCE}\n"
    )


def test_broken_yaml_names_file_automation_and_field(tmp_path: Path) -> None:
    file = tmp_path / "pumps.yaml"
    file.write_text(PUMP_YAML.replace("threshold: 3", "threshold: many"))
    code, out, err = run(file)
    assert (code, out) == (1, "")
    assert err.startswith(f"{file}:10: automation 'pump pressure burst': trigger.threshold: ")


def test_broken_json_reports_every_problem(tmp_path: Path) -> None:
    broken = dict(COMPOSITE, actions=[{"type": "run-deployment"}])
    broken["trigger"] = {"type": "event", "posture": "Proactive", "within": 5}
    file = tmp_path / "doors.json"
    file.write_text(json.dumps([broken]))
    code, out, err = run(file)
    assert (code, out) == (1, "")
    lines = err.splitlines()
    where = f"{file}:1: automation 'door then silence': "
    assert any(
        line.startswith(where + "trigger.within: ") and "10 seconds" in line for line in lines
    ), lines
    assert any(
        line.startswith(where + "actions[0]: ")
        and "'run-deployment'" in line
        and "'call-webhook', 'do-nothing'" in line
        for line in lines
    ), lines


def test_good_and_bad_files_together_fail_and_print_no_summaries(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(PUMP_YAML)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    code, out, err = run(good, bad)
    assert (code, out) == (1, "")
    assert err.startswith(f"{bad}:2: invalid YAML: ")
    assert str(good) not in err


def test_missing_file_and_empty_glob(tmp_path: Path) -> None:
    code, out, err = run(tmp_path / "absent.yaml", tmp_path / "none-*.json")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"{tmp_path / 'absent.yaml'}: no such file",
        f"{tmp_path / 'none-*.json'}: no files match",
        SEE_REFERENCE,
    ]


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(PUMP_YAML)
    (tmp_path / "b.yaml").write_text(PUMP_YAML)
    code, out, err = run(tmp_path / "*.yaml")
    assert (code, out) == (1, "")
    assert "automation 'pump pressure burst': name: also used in" in err


def test_a_file_named_twice_is_checked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("pumps.yaml").write_text(PUMP_YAML)
    code, out, err = run("pumps.yaml", tmp_path / "*.yaml", tmp_path)
    assert (code, err) == (0, "")
    assert out.count("pump pressure burst") == 1


def test_good_config_file_and_its_automations(tmp_path: Path) -> None:
    (tmp_path / "auto").mkdir()
    (tmp_path / "auto" / "pumps.yaml").write_text(PUMP_YAML)
    config = tmp_path / "trigd.toml"
    config.write_text('[server]\nlisten = "0.0.0.0:4280"\n[triggers]\nautomations = ["auto/*"]\n')
    code, out, err = run(config)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{config}: ok (listen 0.0.0.0:4280, 1 automation path)"
    assert lines[1].startswith(f"{tmp_path / 'auto' / 'pumps.yaml'}: pump pressure burst (")
    assert lines[2:] == [REFERENCE]


def test_config_naming_a_broken_automation_file_fails(tmp_path: Path) -> None:
    (tmp_path / "pumps.yaml").write_text(PUMP_YAML.replace("posture: Reactive", "posture: Metric"))
    config = tmp_path / "trigd.toml"
    config.write_text('[triggers]\nautomations = ["pumps.yaml", "missing.json"]\n')
    code, out, err = run(config)
    assert (code, out) == (1, "")
    assert f"{tmp_path / 'missing.json'}: no such file" in err.splitlines()
    assert f"{tmp_path / 'pumps.yaml'}:9: automation 'pump pressure burst': trigger.posture" in err


def test_bad_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "trigd.toml"
    config.write_text('[server]\nlissen = "0.0.0.0:1"\n[delivery]\nconcurrency = 0\n')
    code, out, err = run(config, tmp_path / "absent.toml")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"{config}: [server] unknown key 'lissen' (did you mean 'listen'?)",
        f"{config}: [delivery] concurrency: must be at least 1, got 0",
        f"{tmp_path / 'absent.toml'}: no such file",
        SEE_REFERENCE,
    ]


def test_check_ignores_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIGD_SERVER_LISTEN", "not an address")
    config = tmp_path / "trigd.toml"
    config.write_text("")
    code, out, _ = run(config)
    assert (code, out) == (
        0,
        f"{config}: ok (listen 127.0.0.1:4280, 0 automation paths)\n{REFERENCE}\n",
    )


def test_python_m_daemon_check_subprocess(tmp_path: Path) -> None:
    good = tmp_path / "pumps.yaml"
    good.write_text(PUMP_YAML)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "trigger": {"posture": "Sideways"}, "actions": []}))
    command = [sys.executable, "-m", "daemon", "check"]
    ok = subprocess.run(
        [*command, str(good)], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout.startswith(f"{good}: pump pressure burst (")
    failed = subprocess.run(
        [*command, str(good), str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (failed.returncode, failed.stdout) == (1, "")
    assert failed.stderr.startswith(f"{bad}:1: automation 'x': trigger.posture: ")


def test_check_refuses_a_header_that_would_break_the_request(tmp_path: Path) -> None:
    file = tmp_path / "hooks.yaml"
    file.write_text(
        "name: smuggler\n"
        "trigger: {posture: Reactive, expect: [pump.pressure.high]}\n"
        "actions:\n"
        "  - type: call-webhook\n"
        "    url: https://hooks.example.com/in\n"
        '    headers: {Transfer-Encoding: chunked, X-Key: "k3y\\r\\nHost: other"}\n'
    )
    code, out, err = run(file)
    assert (code, out) == (1, "")
    [problem, pointer] = err.splitlines()
    assert pointer == SEE_REFERENCE
    assert problem.startswith(f"{file}:6: automation 'smuggler': actions[0].headers: ")
    assert "header 'Transfer-Encoding' cannot be set by an automation" in problem
    assert "header 'X-Key': the value must be printable ASCII" in problem
    assert "k3y" not in err


TYPO_YAML = PUMP_YAML.replace("expect:", "expcet:").replace("headers:", "header:")


def test_check_refuses_a_misspelt_key_with_file_line_and_suggestion(tmp_path: Path) -> None:
    """`expcet:` used to be ignored, and the automation then fired on every event."""
    file = tmp_path / "pumps.yaml"
    file.write_text(TYPO_YAML)
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "check", str(file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"{file}:7: automation 'pump pressure burst': trigger.expcet: unknown key "
        "(did you mean 'expect'?)",
        f"{file}:15: automation 'pump pressure burst': actions[0].header: unknown key "
        "(did you mean 'headers'?)",
        SEE_REFERENCE,
    ]
    assert "whsec_abc" not in result.stderr


def test_check_reads_prefects_automations_file_and_durations(tmp_path: Path) -> None:
    file = tmp_path / "prefect.yaml"
    file.write_text(
        "automations:\n"
        "  - name: pump silent\n"
        "    trigger:\n"
        "      posture: Proactive\n"
        "      expect: [pump.heartbeat]\n"
        "      for_each: [prefect.resource.id]\n"
        "      after: [pump.heartbeat]\n"
        "      within: 1h30m\n"
        "    actions: [{type: do-nothing}]\n"
    )
    code, out, err = run(file)
    assert (code, err) == (0, "")
    assert out == (
        f"{file}: pump silent ({automation_id_for('pump silent')}): event Proactive threshold 1 "
        "within 1h30m for_each prefect.resource.id after pump.heartbeat expect pump.heartbeat, "
        "1 action\n"
        f"{REFERENCE}\n"
    )


def test_check_names_the_file_of_a_yaml_error(tmp_path: Path) -> None:
    file = tmp_path / "pumps.yaml"
    file.write_text(PUMP_YAML.replace("posture: Reactive", "posture: [Reactive"))
    code, out, err = run(file)
    assert (code, out) == (1, "")
    assert err.startswith(f"{file}:10: invalid YAML: while parsing a flow sequence from line 9")
    assert "<unicode string>" not in err


LINTED = """\
- name: pump silent
  trigger:
    type: event
    expect: ["pump.heartbeat"]
    for_each: ["prefect.resource.id"]
    posture: Proactive
    within: 60
  actions:
    - type: call-webhook
      url: http://127.0.0.1:9000/hooks/pager
      payload: '{"pump": "{{ event.resource.id }}", "t": "{{ event.payload.temperature }}"}'
"""


def trigd_check(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "daemon", "check", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)


def test_warnings_do_not_fail_check_but_strict_makes_them_errors(tmp_path: Path) -> None:
    file = tmp_path / "silent.yaml"
    file.write_text(LINTED)
    warned = trigd_check(file)
    assert warned.returncode == 0, warned.stderr
    assert "pump silent" in warned.stdout
    assert warned.stderr.startswith(
        f"{file}:5: automation 'pump silent': trigger.for_each: warning: Proactive with "
        "for_each and no after"
    )
    strict = trigd_check("--strict", file)
    assert (strict.returncode, strict.stdout) == (1, "")
    pointer = "see docs/AUTOMATIONS.md for what automation files may say\n"
    assert strict.stderr == warned.stderr + pointer  # the same lines, now failing the check
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(LINTED.replace("    posture:", '    after: ["pump.heartbeat"]\n    posture:'))
    assert trigd_check("--strict", fixed).returncode == 0


def test_a_template_with_an_undefined_name_fails_check(tmp_path: Path) -> None:
    file = tmp_path / "typo.yaml"
    file.write_text(
        LINTED.replace("event.resource.id", "event.resource.idd").replace(
            "{{ event.payload", "{{ evnt.payload"
        )
    )
    result = trigd_check(file)
    assert (result.returncode, result.stdout) == (1, "")
    assert (
        f"{file}:11: automation 'pump silent': actions[0].payload: template fails: "
        "UndefinedError: 'evnt' is undefined (rendered with the built-in sample event; "
        "--event FILE for yours)"
    ) in result.stderr


def test_event_file_renders_templates_with_your_event(tmp_path: Path) -> None:
    file = tmp_path / "silent.yaml"
    file.write_text(LINTED)
    event = tmp_path / "event.json"
    event.write_text(
        json.dumps({"event": "pump.heartbeat", "resource": {"prefect.resource.id": "pump.7"}})
    )
    result = trigd_check("--event", event, file)
    assert result.returncode == 1
    assert (
        "actions[0].payload: template fails: UndefinedError: 'dict object' has no attribute"
        in result.stderr
    )
    assert "rendered with your event" in result.stderr
    event.write_text(
        json.dumps(
            {
                "event": "pump.heartbeat",
                "resource": {"prefect.resource.id": "pump.7"},
                "payload": {"temperature": 20},
            }
        )
    )
    assert trigd_check("--event", event, file).returncode == 0
    event.write_text('{"event": "x"}')
    bad = trigd_check("--event", event, file)
    assert bad.returncode == 1
    assert bad.stderr.startswith(f"--event {event}: not a valid event: resource")
    missing = trigd_check("--event", tmp_path / "none.json", file)
    assert missing.stderr == f"--event {tmp_path / 'none.json'}: No such file or directory\n"
