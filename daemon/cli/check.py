"""`trigd check PATH ...` (docs/OPERATIONS.md#commands): validate config and automation files before
deploying.

`.toml` paths are configuration files, checked with `load_config` and no environment (the
file alone must be valid wherever it is deployed); the automation globs they name are
checked too. Every other path is an automation file, glob or directory. On success one
line per config file and per automation goes to `out`; otherwise every problem goes to
`err`, naming the file and line, the automation and the field (an unknown key with the
closest known one), and the exit code is 1 (docs/TRIGGERS.md#automations-and-ids).

Every payload template is trial-rendered against a sample event (`--event FILE`, one event
as JSON, or a built-in sample), an undefined name or attribute being an error
(docs/DELIVERY.md#templates). Lints (docs/TRIGGERS.md#lints) go to `err` as warnings,
which do not change the exit code unless `strict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TextIO

from daemon.core.automations import (
    Automation,
    AutomationFileError,
    CompoundTrigger,
    EventTrigger,
    SequenceTrigger,
    TriggerTypes,
    expand_automation_paths,
    load_automation_files,
    read_automation_file,
)
from daemon.core.config import Config, ConfigError, load_config
from daemon.core.durations import format_duration
from daemon.core.events import EventRejected, ReceivedEvent, parse_incoming_event
from daemon.core.exit_codes import ExitCode
from daemon.core.lints import Lint, lint_automation, sample_event, template_problems

CONFIG_SUFFIX: Final = ".toml"


def check_command(
    paths: Sequence[str],
    out: TextIO,
    err: TextIO,
    *,
    event: str | None = None,
    strict: bool = False,
) -> int:
    """Exit 0 when every file is valid, else 1 with every problem written to `err`.
    Warnings go to `err` too; with `strict` they are problems."""
    problems: list[str] = []
    warnings: list[str] = []
    summaries: list[str] = []
    sample: ReceivedEvent | None = None
    if event is not None:
        try:
            sample = _read_event(Path(event))
        except ValueError as exc:
            print(exc, file=err)
            return ExitCode.FAILURE
    automation_paths: list[str] = []
    for path in paths:
        if Path(path).suffix.lower() == CONFIG_SUFFIX:
            try:
                config = load_config(Path(path), {}, {})
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
            summaries.append(f"{path}: ok ({_config_summary(config)})")
            automation_paths.extend(config.triggers.automations)
        else:
            automation_paths.append(path)
    files, missing = _expand(automation_paths)
    problems.extend(missing)
    summaries.extend(_check_automation_files(files, problems, warnings, sample))
    if strict:
        problems.extend(warnings)
        warnings = []
    for warning in warnings:
        print(warning, file=err)
    if problems:
        for problem in problems:
            print(problem, file=err)
        print("see docs/AUTOMATIONS.md for what automation files may say", file=err)
        return ExitCode.FAILURE
    for summary in summaries:
        print(summary, file=out)
    print("reference: docs/AUTOMATIONS.md", file=out)
    return ExitCode.OK


def _config_summary(config: Config) -> str:
    count = len(config.triggers.automations)
    noun = "path" if count == 1 else "paths"
    return f"listen {config.server.listen}, {count} automation {noun}"


def _expand(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files to check, one by one so each automation is reported with its own file."""
    files, problems = expand_automation_paths(paths)
    unique: dict[Path, Path] = {}
    for file in files:  # one file named twice (a path and a glob) is checked once
        unique.setdefault(file.resolve(), file)
    return list(unique.values()), problems


def _read_event(path: Path) -> ReceivedEvent:
    """The event of `--event FILE`; ValueError naming the file and why."""
    try:
        return parse_incoming_event(path.read_bytes(), datetime.now(UTC))
    except OSError as exc:
        raise ValueError(f"--event {path}: {exc.strerror or exc}") from None
    except EventRejected as exc:
        raise ValueError(f"--event {path}: not a valid event: {exc}") from None


def _check_automation_files(
    files: Sequence[Path],
    problems: list[str],
    warnings: list[str],
    event: ReceivedEvent | None,
) -> list[str]:
    summaries: list[str] = []
    valid: list[Path] = []
    for file in files:
        try:
            automations = load_automation_files([file])
        except AutomationFileError as exc:
            problems.extend(exc.problems)
            continue
        valid.append(file)
        _lint_file(file, automations, problems, warnings, event)
        summaries.extend(f"{file}: {_automation_summary(a)}" for a in automations)
        if not automations:
            summaries.append(f"{file}: no automations")
    if len(valid) > 1:
        # Names and ids must also be unique across files; only a joint load sees that.
        try:
            load_automation_files(valid)
        except AutomationFileError as exc:
            problems.extend(exc.problems)
    return summaries


def _lint_file(
    file: Path,
    automations: Sequence[Automation],
    problems: list[str],
    warnings: list[str],
    event: ReceivedEvent | None,
) -> None:
    """Lints as warnings and failed trial renders as problems, each at its line."""
    if not automations:
        return
    contents = read_automation_file(file)  # loaded a moment ago: for the lines
    for automation, (_, at) in zip(automations, contents.documents, strict=True):

        def where(lint: Lint, at: tuple[str | int, ...] = at, name: str = automation.name) -> str:
            line = contents.line_of((*at, *lint.path))
            return f"{file}:{line}: automation {name!r}: {lint.field}"

        for lint in lint_automation(automation):
            warnings.append(f"{where(lint)}: warning: {lint.message}")
        sample = event or sample_event(automation)
        against = "your event" if event else "the built-in sample event; --event FILE for yours"
        for lint in template_problems(automation, sample, sample=event is None):
            problems.append(f"{where(lint)}: {lint.message} (rendered with {against})")


def _automation_summary(automation: Automation) -> str:
    actions = len(automation.actions)
    text = f"{automation.name} ({automation.id}): {trigger_summary(automation.trigger)}"
    text += f", {actions} action{'' if actions == 1 else 's'}"
    if automation.actions_on_trigger:
        text += f", {len(automation.actions_on_trigger)} on trigger"
    if automation.actions_on_resolve:
        text += f", {len(automation.actions_on_resolve)} on resolve"
    return text if automation.enabled else f"{text} (disabled)"


def trigger_summary(trigger: TriggerTypes) -> str:
    """One line a person can check against what they meant to write."""
    if isinstance(trigger, EventTrigger):
        text = (
            f"event {trigger.posture.value} threshold {trigger.threshold} "
            f"within {format_duration(trigger.within)}"
        )
        if trigger.for_each:
            text += f" for_each {','.join(sorted(trigger.for_each))}"
        if trigger.after:
            text += f" after {','.join(sorted(trigger.after))}"
        if trigger.expect:
            text += f" expect {','.join(sorted(trigger.expect))}"
        return text
    within = "unlimited" if trigger.within is None else format_duration(trigger.within)
    children = "; ".join(trigger_summary(child) for child in trigger.triggers)
    if isinstance(trigger, CompoundTrigger):
        kind = f"compound require {trigger.require} of {len(trigger.triggers)}"
    else:
        assert isinstance(trigger, SequenceTrigger)
        kind = f"sequence of {len(trigger.triggers)}"
    return f"{kind} within {within} [{children}]"
