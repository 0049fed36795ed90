"""Automations as Prefect stores them (docs/TRIGGERS.md#automations-and-ids), with trigd's stable
ids, and the loader of automation files (same section).

Where trigd differs (docs/TRIGGERS.md#where-trigd-differs-from-prefect): trigger ids are stable. A
trigger keeps the `id` its file gives it, else gets UUIDv5(automation id, position path), the path
being `trigger`, `trigger.triggers[0]`, `trigger.triggers[1].triggers[0]`, ... An automation without
an `id` gets UUIDv5(`AUTOMATION_NAMESPACE`, name). With `BaseTrigger.fingerprint()` this lets the
engine keep the state of unchanged triggers across reloads and restarts.

Files are strict (same section): every model forbids unknown keys, and the loader turns
each into `FIELD: unknown key (did you mean 'KEY'?)`; a key written twice is an error;
every problem carries `FILE:LINE`, the line taken from PyYAML's nodes (JSON is read as
YAML for them). A file may be Prefect's `{automations: [...]}`.

The trigger and action models live in `trigger_models` and `action_models`; they are
re-exported here so callers need only this module.
"""

from __future__ import annotations

import difflib
import functools
import glob
import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NamedTuple, Self
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
from pydantic_core import ErrorDetails

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
    file and line, the automation (name, or index when it has none) and the field."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = tuple(problems)


_UNION_TAGS: Final = frozenset({*TRIGGER_TYPES, *ACTION_TYPES})

Path_ = tuple[int | str, ...]
"""Where a value sits in a file: keys and list indexes from the file's top."""


def data_path(loc: Sequence[int | str]) -> Path_:
    """pydantic's `loc` without the union tags it adds: the keys as written in the file."""
    parts: list[int | str] = []
    for part in loc:
        previous = parts[-1] if parts else None
        if part in _UNION_TAGS and (previous == "trigger" or isinstance(previous, int)):
            continue
        parts.append(part)
    return tuple(parts)


def field_path(loc: Sequence[int | str]) -> str:
    """`("trigger", "compound", "triggers", 0, "event", "within")` ->
    `trigger.triggers[0].within`: the union tags pydantic puts in paths are dropped."""
    return format_loc(data_path(loc))


_MODELS_BY_TAG: Final[Mapping[str, type[BaseModel]]] = MappingProxyType(
    {
        "event": EventTrigger,
        "compound": CompoundTrigger,
        "sequence": SequenceTrigger,
        "call-webhook": CallWebhook,
        "do-nothing": DoNothing,
    }
)
_AUTOMATION_KEYS: Final = (*Automation.model_fields, "owner_resource")


def _known_keys(loc: Sequence[int | str]) -> tuple[str, str, tuple[str, ...]]:
    """For an unknown key at `loc`: the union tag of the model it was given to (`""` for
    the automation itself), what to call that model, and its keys."""
    if len(loc) >= 2 and isinstance(tag := loc[-2], str) and tag in _MODELS_BY_TAG:
        kind = f"{tag} trigger" if tag in TRIGGER_TYPES else f"{tag} action"
        return tag, kind, tuple(_MODELS_BY_TAG[tag].model_fields)
    return "", "automation", _AUTOMATION_KEYS


def unknown_key_reason(loc: Sequence[int | str]) -> str:
    """`unknown key (did you mean 'expect'?)`: the closest key the model knows, else the
    trigger type the key belongs to, else the keys it knows."""
    key = str(loc[-1])
    tag, kind, known = _known_keys(loc)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    if tag in TRIGGER_TYPES:
        owners = [t for t in TRIGGER_TYPES if key in _MODELS_BY_TAG[t].model_fields]
        if owners:
            return (
                f"unknown key: {kind}s have no {key!r}, {' and '.join(owners)} triggers do "
                "(put it on the child triggers)"
            )
    return f"unknown key; a{'n' if kind[0] in 'aeiou' else ''} {kind} has: {', '.join(known)}"


def _reason(error: ErrorDetails) -> str:
    if error["type"] == "extra_forbidden" and error["loc"]:
        return unknown_key_reason(error["loc"])
    return error_reason(error)


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


class FileProblem(ValueError):
    """A file that holds no automations to validate, with the line where it goes wrong."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class DuplicateKey(FileProblem):
    """A key written twice in one mapping."""


class Document(NamedTuple):
    """One automation as read from a file, and where it sits there."""

    data: Any
    path: Path_


class FileContents(NamedTuple):
    """The automations of a file, and the line of every key and list item in it."""

    documents: list[Document]
    lines: dict[Path_, int]

    def line_of(self, path: Path_) -> int:
        """The line of `path`, else of the closest enclosing value that has one."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return 1


def _node_lines(root: yaml.Node) -> dict[Path_, int]:
    """The 1-based line of every mapping key and list item under `root`. A node reached
    again through an alias is walked once (its keys then have the line of the alias). A
    key written twice in one mapping is a FileProblem: YAML would keep the last silently."""
    lines: dict[Path_, int] = {(): root.start_mark.line + 1}
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, Path_]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    child = (*path, str(key.value))
                    line = key.start_mark.line + 1
                    first = keys.get(str(key.value))
                    if first is not None:  # PyYAML and json would silently keep the last one
                        raise DuplicateKey(
                            line, f"{format_loc(child)}: duplicate key (first at line {first})"
                        )
                    keys[str(key.value)] = line
                    lines.setdefault(child, line)
                    stack.append((value, child))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = (*path, index)
                lines.setdefault(child, item.start_mark.line + 1)
                stack.append((item, child))
    return lines


def _yaml_problem(exc: yaml.YAMLError, what: str) -> FileProblem:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        context = exc.context
        started = exc.context_mark
        if context and started is not None and mark is not None and started.line != mark.line:
            context += f" from line {started.line + 1}"
        reason = "; ".join(p for p in (context, exc.problem) if p)
        line = mark.line + 1 if mark is not None else 1
        column = f" (column {mark.column + 1})" if mark is not None else ""
        return FileProblem(line, f"invalid {what}: {reason}{column}")
    return FileProblem(1, f"invalid {what}: {exc}")


def _compose(text: str, name: str, what: str) -> tuple[Any, dict[Path_, int]]:
    """The data of a YAML text and the line of each of its values."""
    loader = yaml.SafeLoader(text)
    loader.name = name  # marks say the file, not "<unicode string>"
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}
        lines = _node_lines(root)
        return loader.construct_document(root), lines
    except yaml.YAMLError as exc:
        raise _yaml_problem(exc, what) from None
    finally:
        loader.dispose()


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise FileProblem(line, f"not UTF-8: {exc.reason} at byte {exc.start}") from None


def read_automation_file(path: Path) -> FileContents:
    """The automations of one file: a JSON/YAML automation, a list of them, or Prefect's
    `{automations: [...]}` (as `prefect automation create --from-file` takes). Raises
    OSError, or FileProblem with the line where the file goes wrong."""
    text = _decode(path.read_bytes())
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FileProblem(exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        try:  # JSON is YAML: its nodes give the lines
            lines = _compose(text, str(path), "JSON")[1]
        except DuplicateKey:
            raise
        except FileProblem:
            lines = {}  # JSON that PyYAML does not read: every problem on line 1
    else:
        data, lines = _compose(text, str(path), "YAML")
    contents = FileContents([], lines)
    if data is None:
        return contents
    if isinstance(data, dict) and "automations" in data:
        others = sorted(str(key) for key in data if key != "automations")
        if others:
            raise FileProblem(
                contents.line_of((others[0],)),
                f"{others[0]}: unknown key; a file with an 'automations' list holds only it",
            )
        listed = data["automations"]
        if not isinstance(listed, list):
            raise FileProblem(contents.line_of(("automations",)), "automations: must be a list")
        contents.documents.extend(
            Document(item, ("automations", i)) for i, item in enumerate(listed)
        )
    elif isinstance(data, dict):
        contents.documents.append(Document(data, ()))
    elif isinstance(data, list):
        contents.documents.extend(Document(item, (i,)) for i, item in enumerate(data))
    else:
        raise FileProblem(
            contents.line_of(()),
            "a file must hold an automation, a list of automations or {automations: [...]}",
        )
    return contents


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


def _where(file: Path, contents: FileContents, at: Path_, label: str, path: Path_) -> str:
    """`FILE:LINE: automation 'NAME'`, the line being that of `path` in the automation."""
    return f"{file}:{contents.line_of((*at, *path))}: {label}"


def _problem_path(problem: str) -> Path_:
    """`actions[0].headers.X-Token: why` -> `("actions", 0, "headers")`, for its line."""
    field, _, rest = problem.partition("[")
    index, _, rest = rest.partition("].")
    key = rest.split(".", 1)[0].split(":", 1)[0]
    return (field, int(index), key) if index.isdigit() else (field,)


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
            contents = read_automation_file(file)
            stamp = loaded_at or datetime.fromtimestamp(file.stat().st_mtime, UTC)
        except FileProblem as exc:
            problems.append(f"{file}:{exc.line}: {exc}")
            continue
        except OSError as exc:
            problems.append(f"{file}: {exc.strerror or exc}")
            continue
        for index, (document, at) in enumerate(contents.documents):
            name = document.get("name") if isinstance(document, dict) else None
            label = f"automation {name!r}" if isinstance(name, str) else f"automation #{index}"
            where = functools.partial(_where, file, contents, at, label)

            if isinstance(document, dict):
                document = {"created": stamp, "updated": stamp, **document}
            try:
                automation = Automation.model_validate(document)
            except ValidationError as exc:
                problems.extend(
                    f"{where(data_path(e['loc']))}: {field_path(e['loc']) or '(automation)'}: "
                    f"{_reason(e)}"
                    for e in exc.errors()
                )
                continue
            if unresolved := reference_problems(automation, environ):
                problems.extend(f"{where(_problem_path(text))}: {text}" for text in unresolved)
                continue
            if automation.name in by_name:
                also = by_name[automation.name]
                problems.append(f"{where(('name',))}: name: also used in {also}")
                continue
            if automation.id in by_id:
                problems.append(
                    f"{where(('id',))}: id: {automation.id} is also used by {by_id[automation.id]}"
                )
                continue
            by_name[automation.name] = by_id[automation.id] = where(())
            automations.append(automation)
    if problems:
        raise AutomationFileError(problems)
    return automations
