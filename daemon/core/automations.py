"""Automations as Prefect stores them (docs/TRIGGERS.md#automations-and-ids), with trigd's stable
ids, and the loader of automation files (same section).

Where trigd differs (docs/TRIGGERS.md#where-trigd-differs-from-prefect): trigger ids are stable. A
trigger keeps the `id` its file gives it, else gets UUIDv5(automation id, position path), the path
being `trigger`, `trigger.triggers[0]`, `trigger.triggers[1].triggers[0]`, ... An automation without
an `id` gets UUIDv5(`AUTOMATION_NAMESPACE`, name). With `BaseTrigger.fingerprint()` this lets the
engine keep the state of unchanged triggers across reloads and restarts.

The trigger and action models live in `trigger_models` and `action_models`; they are
re-exported here so callers need only this module.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Self
from uuid import UUID, uuid5

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.core.action_models import (
    ACTION_TYPES,
    ActionTypes,
    AnyAction,
    CallWebhook,
    DoNothing,
    UnresolvedReferences,
    resolve_webhook,
)
from daemon.core.events import UTCDateTime, error_reason, format_loc
from daemon.core.trigger_models import (
    TRIGGER_TYPES,
    AnyTrigger,
    BaseTrigger,
    CompositeTrigger,
    CompoundTrigger,
    EventTrigger,
    Posture,
    SequenceTrigger,
    TriggerTypes,
    parse_trigger,
)

__all__ = [
    "ACTION_TYPES",
    "AUTOMATION_NAMESPACE",
    "AUTOMATION_SUFFIXES",
    "TRIGGER_TYPES",
    "ActionTypes",
    "AnyAction",
    "AnyTrigger",
    "Automation",
    "AutomationFileError",
    "BaseTrigger",
    "CallWebhook",
    "CompositeTrigger",
    "CompoundTrigger",
    "DoNothing",
    "EventTrigger",
    "Posture",
    "SequenceTrigger",
    "TriggerTypes",
    "automation_id_for",
    "expand_automation_paths",
    "load_automation_files",
    "parse_trigger",
    "reference_problems",
    "trigger_id_for",
]

AUTOMATION_NAMESPACE: Final = UUID("6f0e2a52-7c1d-5b8e-9a43-2d7f1c0b9e61")
"""Namespace of UUIDv5 automation ids derived from names. Never change it: ids key state."""

ACTION_LISTS: Final = ("actions", "actions_on_trigger", "actions_on_resolve")

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
"""`created`/`updated` of an automation built in code without them (the loader sets them)."""


# --- Automation ---------------------------------------------------------------------------


def automation_id_for(name: str) -> UUID:
    """The id of an automation whose file gives none."""
    return uuid5(AUTOMATION_NAMESPACE, name)


def trigger_id_for(automation_id: UUID, path: str) -> UUID:
    """The id of a trigger whose file gives none: stable while it keeps its position."""
    return uuid5(automation_id, path)


def _with_stable_ids(trigger: Any, automation_id: UUID, path: str) -> Any:
    """Fill in missing trigger ids, recursively, on raw dicts or already-built triggers."""
    if isinstance(trigger, dict):
        trigger = dict(trigger)
        if trigger.get("id") is None:
            trigger["id"] = trigger_id_for(automation_id, path)
        children = trigger.get("triggers")
        if isinstance(children, list):
            trigger["triggers"] = [
                _with_stable_ids(child, automation_id, f"{path}.triggers[{i}]")
                for i, child in enumerate(children)
            ]
        return trigger
    if isinstance(trigger, BaseTrigger):
        update: dict[str, Any] = {}
        if "id" not in trigger.model_fields_set:
            update["id"] = trigger_id_for(automation_id, path)
        if isinstance(trigger, CompositeTrigger):
            update["triggers"] = [
                _with_stable_ids(child, automation_id, f"{path}.triggers[{i}]")
                for i, child in enumerate(trigger.triggers)
            ]
        return trigger.model_copy(update=update) if update else trigger
    return trigger


class Automation(BaseModel):
    """An automation as stored and returned by Prefect, with trigd's stable ids. Its
    validation errors never show the input, which may hold secrets."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str
    description: str = ""
    enabled: bool = True
    tags: list[str] = Field(default_factory=list)
    trigger: AnyTrigger
    actions: list[AnyAction]
    actions_on_trigger: list[AnyAction] = Field(default_factory=list)
    actions_on_resolve: list[AnyAction] = Field(default_factory=list)
    id: UUID = UUID(int=0)  # never used: _assign_ids always sets it (from the name)
    created: UTCDateTime = EPOCH
    updated: UTCDateTime = EPOCH

    @model_validator(mode="before")
    @classmethod
    def _assign_ids(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        data.pop("owner_resource", None)  # sent by Prefect clients; meaningless here
        if data.get("id") is None:
            name = data.get("name")
            # A nil placeholder only when the name is invalid, which fails anyway.
            data["id"] = automation_id_for(name) if isinstance(name, str) else UUID(int=0)
        try:
            automation_id = UUID(str(data["id"]))
        except ValueError:
            return data  # the field's own validation reports it
        if "trigger" in data:
            data["trigger"] = _with_stable_ids(data["trigger"], automation_id, "trigger")
        return data

    @field_validator("trigger")
    @classmethod
    def _unique_trigger_ids(cls, trigger: TriggerTypes) -> TriggerTypes:
        seen: set[UUID] = set()
        for t in trigger.all_triggers():
            if t.id in seen:
                raise ValueError(f"trigger id {t.id} is used by more than one trigger")
            seen.add(t.id)
        return trigger

    def model_post_init(self, context: Any, /) -> None:
        # Derived maps live in __dict__ beside the fields (not compared, not serialized).
        # `_parents` holds the enclosing composite (None for the top trigger), so
        # `parent_of`, called for every firing, is one lookup.
        parents: dict[UUID, CompositeTrigger | None] = {}
        paths: dict[UUID, str] = {}

        def walk(trigger: TriggerTypes, parent: CompositeTrigger | None, path: str) -> None:
            parents[trigger.id] = parent
            paths[trigger.id] = path
            if isinstance(trigger, CompositeTrigger):
                for i, child in enumerate(trigger.triggers):
                    walk(child, trigger, f"{path}.triggers[{i}]")

        walk(self.trigger, None, "trigger")
        self.__dict__["_parents"] = parents
        self.__dict__["_paths"] = paths
        self.__dict__.pop("_redacted", None)  # a copy's fields may differ from the original's

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        copied.model_post_init(None)  # the copy's derived state must follow its fields
        return copied

    def __hash__(self) -> int:
        return hash(self.id)

    def all_triggers(self) -> Sequence[TriggerTypes]:
        """Every trigger, depth first, the top trigger first."""
        return self.trigger.all_triggers()

    def event_triggers(self) -> list[EventTrigger]:
        """The triggers that see events: all EventTriggers, composite children included."""
        return [t for t in self.all_triggers() if isinstance(t, EventTrigger)]

    def trigger_by_id(self, trigger_id: UUID) -> TriggerTypes | None:
        for trigger in self.all_triggers():
            if trigger.id == trigger_id:
                return trigger
        return None

    def parent_of(self, trigger_id: UUID) -> Automation | CompositeTrigger:
        """The enclosing composite trigger, or the automation for the top trigger.
        Raises KeyError for a trigger that is not part of this automation."""
        parents: dict[UUID, CompositeTrigger | None] = self.__dict__["_parents"]
        parent = parents[trigger_id]
        return self if parent is None else parent

    def path_of(self, trigger_id: UUID) -> str:
        """Position path of a trigger (`trigger.triggers[0]`); KeyError if unknown."""
        paths: dict[UUID, str] = self.__dict__["_paths"]
        return paths[trigger_id]

    def redacted(self) -> Automation:
        """This automation as documents show it: every action `redacted()` (no secrets, no
        header values). What act() stores with each firing and templates see; kept once
        made, as every firing of the automation needs it."""
        redacted: Automation | None = self.__dict__.get("_redacted")
        if redacted is None:
            redacted = self.model_copy(
                update={
                    field: [action.redacted() for action in getattr(self, field)]
                    for field in ACTION_LISTS
                }
            )
            self.__dict__["_redacted"] = redacted
        return redacted

    def all_actions(self) -> list[ActionTypes]:
        """actions + actions_on_trigger + actions_on_resolve: `action_index` indexes this."""
        return [*self.actions, *self.actions_on_trigger, *self.actions_on_resolve]


# --- Loading files ------------------------------------------------------------------------


class AutomationFileError(Exception):
    """Automation files that cannot be loaded; one line per problem, each naming the
    file, the automation (name, or index when it has none) and the field."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = tuple(problems)


_UNION_TAGS: Final = frozenset({*TRIGGER_TYPES, *ACTION_TYPES})


def field_path(loc: Sequence[int | str]) -> str:
    """`("trigger", "compound", "triggers", 0, "event", "within")` ->
    `trigger.triggers[0].within`: the union tags pydantic puts in paths are dropped."""
    parts: list[int | str] = []
    for part in loc:
        previous = parts[-1] if parts else None
        if part in _UNION_TAGS and (previous == "trigger" or isinstance(previous, int)):
            continue
        parts.append(part)
    return format_loc(parts)


AUTOMATION_SUFFIXES: Final = frozenset({".yaml", ".yml", ".json"})
"""What a directory named as an automation path contributes."""


def expand_automation_paths(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """The files that files, globs and directories name, in order (duplicates kept), and
    one problem per path that names nothing."""
    files: list[Path] = []
    problems: list[str] = []
    for path in paths:
        text = str(path)
        candidate = Path(path)
        if any(c in text for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True))
            files.extend(found)
            if not found:
                problems.append(f"{text}: no files match")
        elif candidate.is_dir():
            files.extend(sorted(p for p in candidate.iterdir() if p.suffix in AUTOMATION_SUFFIXES))
        elif candidate.exists():
            files.append(candidate)
        else:
            problems.append(f"{text}: no such file")
    return files, problems


def _read_documents(path: Path) -> list[Any]:
    """The automations in one file: a JSON/YAML object or list of them."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return []
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        return data
    raise ValueError("a file must hold an automation or a list of automations")


def reference_problems(automation: Automation, environ: Mapping[str, str]) -> list[str]:
    """`field: why` for every secret or header reference of the automation's webhooks that
    does not resolve in `environ` (see `daemon.core.references`)."""
    problems: list[str] = []
    for field in ACTION_LISTS:
        for index, action in enumerate(getattr(automation, field)):
            if not isinstance(action, CallWebhook):
                continue
            try:
                resolve_webhook(action, environ)
            except UnresolvedReferences as exc:
                problems.extend(f"{field}[{index}].{problem}" for problem in exc.problems)
    return problems


def load_automation_files(
    paths: Sequence[str | Path],
    *,
    loaded_at: datetime | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[Automation]:
    """Load every automation of the given files, globs and directories.

    Names and ids must be unique across all files. An automation without `created` or
    `updated` gets `loaded_at`, or else its file's modification time. Secret and header
    references must resolve in `environ` (default: this process's environment); the
    automations keep them as written. Every problem of every file is reported together in
    one AutomationFileError.
    """
    environ = os.environ if environ is None else environ
    files, problems = expand_automation_paths(paths)
    automations: list[Automation] = []
    by_name: dict[str, str] = {}
    by_id: dict[UUID, str] = {}
    for file in dict.fromkeys(files):
        try:
            documents = _read_documents(file)
            stamp = loaded_at or datetime.fromtimestamp(file.stat().st_mtime, UTC)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            problems.append(f"{file}: {exc}")
            continue
        for index, document in enumerate(documents):
            name = document.get("name") if isinstance(document, dict) else None
            label = f"automation {name!r}" if isinstance(name, str) else f"automation #{index}"
            where = f"{file}: {label}"
            if isinstance(document, dict):
                document = {"created": stamp, "updated": stamp, **document}
            try:
                automation = Automation.model_validate(document)
            except ValidationError as exc:
                problems.extend(
                    f"{where}: {field_path(e['loc']) or '(automation)'}: {error_reason(e)}"
                    for e in exc.errors()
                )
                continue
            if unresolved := reference_problems(automation, environ):
                problems.extend(f"{where}: {problem}" for problem in unresolved)
                continue
            if automation.name in by_name:
                problems.append(f"{where}: name: also used in {by_name[automation.name]}")
                continue
            if automation.id in by_id:
                problems.append(
                    f"{where}: id: {automation.id} is also used by {by_id[automation.id]}"
                )
                continue
            by_name[automation.name] = by_id[automation.id] = where
            automations.append(automation)
    if problems:
        raise AutomationFileError(problems)
    return automations
