"""A real engine on a real SQLite file, driven in the notation of the scenario tests.

`R(e)` is the full reactive evaluation (causal ordering + triggers) of one event,
`P(trigger, t)` one proactive evaluation at wall time t, `PER(t)` the periodic pass.
Firings are observed through what they really produce: outbox rows (one per action,
each automation here has one do-nothing action unless a test says otherwise) and the
`prefect.automation.triggered` events in the inbox.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID, uuid4

from daemon.core.automations import Automation, EventTrigger
from daemon.core.events import ReceivedEvent
from daemon.core.firings import TriggeredAction
from daemon.engine.engine import Engine, Outcome
from store.db import Store

T = datetime(2026, 8, 21, 16, 0, 0, tzinfo=UTC)
"""The frozen wall clock and start of every scenario (S = T)."""

SPIDER = {
    "prefect.resource.id": "daddy-long-legs",
    "kingdom": "Animalia",
    "phylum": "Arthropoda",
    "class": "Arachnida",
    "order": "Araneae",
    "family": "Pholcidae",
    "genus": "Pholcus",
    "species": "phalangioides",
}
CHONK = {
    "prefect.resource.id": "woodchonk",
    "kingdom": "Animalia",
    "phylum": "Chordata",
    "class": "Mammalia",
    "order": "Rodentia",
    "family": "Sciuridae",
    "genus": "Marmota",
    "species": "monax",
}
LILY = {
    "prefect.resource.id": "my-lily",
    "prefect.resource.role": "meal",
    "genus": "Hemerocallis",
    "species": "fulva",
    "kingdom": "Plantae",
}
TULIP = {
    "prefect.resource.id": "my-tulip",
    "prefect.resource.role": "meal",
    "genus": "Tulipa",
    "species": "gesneriana",
    "kingdom": "Plantae",
}
HEART = {
    "prefect.resource.id": "my-bleeding-heart",
    "prefect.resource.role": "meal",
    "genus": "Dicentra",
    "species": "cucullaria",
    "kingdom": "Plantae",
}
DAFFODIL = {
    "prefect.resource.id": "my-daffodil",
    "prefect.resource.role": "meal",
    "genus": "Narcissus",
    "species": "poeticus",
    "kingdom": "Plantae",
}
MARMOT = {"genus": "Marmota", "species": "monax"}


def trigger(**fields: Any) -> dict[str, Any]:
    return {"type": "event", "posture": "Reactive", **fields}


def automation(name: str, trigger_: dict[str, Any], **extra: Any) -> Automation:
    return Automation.model_validate(
        {"name": name, "trigger": trigger_, "actions": [{"type": "do-nothing"}], **extra}
    )


ARACHNOPHOBIA = automation(
    "arachnophobia",
    trigger(
        expect=["animal.walked"],
        match={"class": "Arachnida", "order": "Araneae"},
        threshold=1,
        within=0,
    ),
)
CHONK_PARTY = automation(
    "chonk party",
    trigger(expect=["animal.walked"], match=MARMOT, threshold=3, within=10),
)
CHONK_LONELY = automation(
    "chonk lonely",
    trigger(expect=["animal.table_for_one"], match=MARMOT, threshold=1, within=10),
)
CHONK_SADNESS = automation(
    "chonk sadness",
    trigger(expect=["animal.walked"], match=MARMOT, posture="Proactive", threshold=1, within=30),
)
LILIES = automation(
    "lilies",
    trigger(
        expect=["animal.ingested"],
        match_related={
            "prefect.resource.role": "meal",
            "genus": "Hemerocallis",
            "species": "fulva",
        },
        threshold=0,
        within=30,
    ),
)
ANIMAL_LOVER = automation(
    "animal lover", trigger(match={"kingdom": "Animalia"}, threshold=0, within=30)
)
EFFECTIVE = [ARACHNOPHOBIA, CHONK_PARTY, CHONK_SADNESS, CHONK_LONELY]


def event(
    name: str,
    occurred: datetime,
    resource: dict[str, str] | str,
    *,
    related: Sequence[dict[str, str]] = (),
    received: datetime | None = None,
    follows: UUID | None = None,
    id: UUID | None = None,
    payload: dict[str, Any] | None = None,
) -> ReceivedEvent:
    return ReceivedEvent.model_validate(
        {
            "occurred": occurred,
            "event": name,
            "resource": {"prefect.resource.id": resource}
            if isinstance(resource, str)
            else resource,
            "related": list(related),
            "payload": payload or {},
            "id": id or uuid4(),
            "follows": follows,
            "received": received or occurred,
        }
    )


def spider_walked() -> ReceivedEvent:
    return event("animal.walked", T + timedelta(microseconds=1), SPIDER)


def chonk_walked() -> ReceivedEvent:
    return event("animal.walked", T + timedelta(microseconds=2), CHONK)


def chonk_table() -> ReceivedEvent:
    return event("animal.table_for_one", T + timedelta(microseconds=2), CHONK)


def nibbled() -> ReceivedEvent:
    return event("animal.ingested", T + timedelta(microseconds=2), CHONK, related=[LILY, TULIP])


def gobbled() -> ReceivedEvent:
    return event("animal.ingested", T + timedelta(microseconds=3), CHONK, related=[HEART, DAFFODIL])


def moved(e: ReceivedEvent, by: timedelta, **update: Any) -> ReceivedEvent:
    """The same event (same id) at another time, as Prefect's tests mutate theirs."""
    return e.model_copy(update={"occurred": e.occurred + by, **update})


class Harness:
    def __init__(self, path: Path, automations: Sequence[Automation], **engine: Any) -> None:
        self.store = Store.open(path)
        self.conn = self.store.conn
        self.engine = Engine(**engine)
        self.now = T
        self._reported: set[str] = set()
        with self.conn:
            self.engine.load_automations(self.conn, automations, T)

    def close(self) -> None:
        self.store.close()

    def R(self, e: ReceivedEvent, now: datetime | None = None) -> Outcome:
        """Reactive evaluation only (no duplicate check), in one transaction."""
        from daemon.engine.ordering import EventArrivedEarly

        with self.conn:
            try:
                self.engine.reactive_evaluation(self.conn, e, 0, now or self.now)
            except EventArrivedEarly:
                return Outcome.parked
        return Outcome.processed

    def batch(self, events: Sequence[ReceivedEvent], now: datetime | None = None) -> list[Outcome]:
        with self.conn:
            outcomes = self.engine.process_batch(self.conn, events, now or self.now).outcomes
        return outcomes

    def P(self, a: Automation, at: datetime, trigger_id: UUID | None = None) -> datetime:
        with self.conn:
            run_again = self.engine.proactive_evaluation(self.conn, trigger_id or a.trigger.id, at)
        return run_again

    def PER(self, at: datetime) -> int:
        with self.conn:
            swept = self.engine.periodic(self.conn, at).swept
        return swept

    def actions(self) -> list[TriggeredAction]:
        """Every outbox row ever written, oldest first."""
        rows = self.conn.execute("SELECT document FROM outbox ORDER BY id").fetchall()
        return [TriggeredAction.model_validate_json(str(r[0])) for r in rows]

    def new_actions(self) -> list[TriggeredAction]:
        """Outbox rows written since the last call."""
        fresh = [a for a in self.actions() if str(a.id) not in self._reported]
        self._reported.update(str(a.id) for a in fresh)
        return fresh

    def inbox(self) -> list[dict[str, Any]]:
        return [
            json.loads(str(r[0]))
            for r in self.conn.execute("SELECT event FROM inbox ORDER BY seq").fetchall()
        ]

    def buckets(self, trigger_id: UUID | None = None) -> Any:
        sql = "SELECT bucketing_key, start_us, end_us, count FROM buckets"
        if trigger_id is None:
            return self.conn.execute(sql).fetchall()
        return self.conn.execute(sql + " WHERE trigger_id = ?", (str(trigger_id),)).fetchall()


def fired(h: Harness, a: Automation | None = None) -> list[TriggeredAction]:
    """The firings since last asked (of one automation, when given)."""
    fresh = h.new_actions()
    return [x for x in fresh if a is None or x.automation.id == a.id]


def only_trigger(a: Automation) -> EventTrigger:
    assert isinstance(a.trigger, EventTrigger)
    return a.trigger


class HarnessMaker(Protocol):
    """The `harness` fixture (tests/conftest.py): a `Harness` on a fresh database file in
    the test's tmp_path, closed after the test."""

    def __call__(self, automations: Sequence[Automation], **engine: Any) -> Harness: ...
