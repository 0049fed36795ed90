"""Secret references (`env:`, `file:`, `credential:`): resolution, and the load errors of
references that do not resolve, which name the field and the reference, never a value."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from daemon.cli.check import check_command
from daemon.core.action_models import CallWebhook, UnresolvedReferences, resolve_webhook
from daemon.core.automations import AutomationFileError, load_automation_files
from daemon.core.references import MAX_REFERENCED_BYTES, UnresolvedReference, is_reference, resolve

VALUE = "tok-8c1f5e0b"  # what the references resolve to: never in an error


def test_env_file_and_credential_references_resolve(tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_text(f"{VALUE}\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "hook").write_text(f"{VALUE}\r\n")
    environ = {"HOOK": VALUE, "CREDENTIALS_DIRECTORY": str(credentials)}
    assert resolve("env:HOOK", environ) == VALUE
    assert resolve(f"file:{tmp_path / 'hook.secret'}", environ) == VALUE
    assert resolve("credential:hook", environ) == VALUE


def test_only_one_trailing_newline_of_a_file_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "s").write_bytes(b" two lines\nof it\n\n")
    assert resolve(f"file:{tmp_path / 's'}", {}) == " two lines\nof it\n"


def test_literals_and_the_literal_escape() -> None:
    assert resolve("Bearer abc", {}) == "Bearer abc"
    assert resolve("whsec_abc", {}) == "whsec_abc"
    assert resolve("https://x:1/y", {}) == "https://x:1/y"  # only the three schemes are refs
    assert resolve("literal:env:HOOK", {"HOOK": VALUE}) == "env:HOOK"
    assert resolve("literal:literal:x", {}) == "literal:x"
    assert [is_reference(t) for t in ("env:A", "file:/a", "credential:a", "literal:a")] == [
        True
    ] * 4
    assert not is_reference("Bearer env:A")


@pytest.mark.parametrize(
    ("reference", "why"),
    [
        ("env:MISSING", "'env:MISSING': the environment variable MISSING is not set"),
        ("env:", "'env:' names no environment variable"),
        ("env:EMPTY", "'env:EMPTY' is empty"),
        ("file:relative/path", "'file:relative/path': a file: reference needs an absolute path"),
        ("file:/nonexistent/trigd/secret", "cannot be read: no such file or directory"),
        ("credential:hook", "$CREDENTIALS_DIRECTORY is not set"),
    ],
)
def test_references_that_do_not_resolve(reference: str, why: str) -> None:
    with pytest.raises(UnresolvedReference) as exc:
        resolve(reference, {"EMPTY": ""})
    assert why in str(exc.value)


@pytest.mark.parametrize("name", ["../hook", "a/b", "..", "."])
def test_a_credential_is_a_plain_name_in_the_directory(tmp_path: Path, name: str) -> None:
    (tmp_path / "hook").write_text(VALUE)
    inner = tmp_path / "creds"
    inner.mkdir()
    with pytest.raises(UnresolvedReference, match="a credential name is a plain file name"):
        resolve(f"credential:{name}", {"CREDENTIALS_DIRECTORY": str(inner)})


def test_files_too_big_or_not_text_are_refused(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * (MAX_REFERENCED_BYTES + 1))
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    with pytest.raises(UnresolvedReference, match="larger than"):
        resolve(f"file:{tmp_path / 'big'}", {})
    with pytest.raises(UnresolvedReference, match="not UTF-8"):
        resolve(f"file:{tmp_path / 'binary'}", {})


def test_resolved_header_values_are_checked_like_literal_ones(tmp_path: Path) -> None:
    (tmp_path / "v").write_text(f"{VALUE}\r\nX-Injected: 1\n")
    action = CallWebhook(
        url="https://e.com/h",
        headers={"X-Ok": "env:OK", "X-Bad": f"file:{tmp_path / 'v'}", "X-Gone": "env:GONE"},
        secret="env:GONE",
    )
    with pytest.raises(UnresolvedReferences) as exc:
        resolve_webhook(action, {"OK": VALUE})
    assert exc.value.problems == (
        f"headers.X-Bad: the value 'file:{tmp_path / 'v'}' resolves to must be printable ASCII, "
        "without CR, LF, NUL or other control characters and without leading or trailing "
        "whitespace",
        "headers.X-Gone: 'env:GONE': the environment variable GONE is not set",
        "secret: 'env:GONE': the environment variable GONE is not set",
    )
    assert VALUE not in str(exc.value)
    resolved = resolve_webhook(action.model_copy(update={"headers": {"X-Ok": "env:OK"}}), {
        "OK": VALUE, "GONE": "s"
    })  # fmt: skip
    assert resolved == ({"X-Ok": VALUE}, "s")


def hook_automation(**action: Any) -> dict[str, Any]:
    return {
        "name": "hooked",
        "trigger": {"posture": "Reactive", "expect": ["pump.pressure.high"]},
        "actions": [{"type": "do-nothing"}],
        "actions_on_resolve": [{"type": "call-webhook", "url": "https://e.com/h", **action}],
    }


def test_loading_keeps_references_as_written_and_checks_they_resolve(tmp_path: Path) -> None:
    file = tmp_path / "a.json"
    file.write_text(json.dumps(hook_automation(secret="env:HOOK", headers={"X-K": "env:KEY"})))
    [automation] = load_automation_files([file], environ={"HOOK": VALUE, "KEY": VALUE})
    action = automation.actions_on_resolve[0]
    assert isinstance(action, CallWebhook)
    assert (action.secret, action.headers) == ("env:HOOK", {"X-K": "env:KEY"})
    assert VALUE not in automation.model_dump_json()

    with pytest.raises(AutomationFileError) as exc:
        load_automation_files([file], environ={"KEY": VALUE})
    assert exc.value.problems == (
        f"{file}:1: automation 'hooked': actions_on_resolve[0].secret: "
        "'env:HOOK': the environment variable HOOK is not set",
    )


def test_check_resolves_references_in_its_own_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "a.json"
    file.write_text(json.dumps(hook_automation(headers={"Authorization": "credential:api"})))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    out, err = io.StringIO(), io.StringIO()
    assert check_command([str(file)], out, err) == 1
    assert err.getvalue() == (
        f"{file}:1: automation 'hooked': actions_on_resolve[0].headers.Authorization: "
        "'credential:api': $CREDENTIALS_DIRECTORY is not set (systemd sets it for a service "
        "with LoadCredential=)\n"
        "see docs/AUTOMATIONS.md for what automation files may say\n"
    )
    (tmp_path / "api").write_text(f"Bearer {VALUE}\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    out, err = io.StringIO(), io.StringIO()
    assert check_command([str(file)], out, err) == 0, err.getvalue()
    assert VALUE not in out.getvalue()
