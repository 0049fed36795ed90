"""The life of one outbox row, and when to try it again (docs/DELIVERY.md#delivery-states,
#outcomes-and-retries).

Theory of operation
-------------------
Every triggered action is one outbox row, written `pending` in the transaction of the
firing that made it. The sender *claims* a due row (`pending` → `in_flight`) with a lease,
makes one attempt, and in one transaction records the attempt and moves the row on:

    pending ──claim──▶ in_flight ──succeed──▶ delivered
       ▲                 │  │
       │◀────retry───────┘  └────die────▶ dead
       │◀──lease expired──┘                 │
       └───────────────revive───────────────┘   (operator: `trigd outbox retry`)

A lease that runs out means the sender stopped mid-attempt (crash, SIGKILL): the row goes
back to `pending` and is sent again with the same `webhook-id` — at least once, never
"at most once". `delivered` is final; `dead` is final until an operator revives it.
An operator may cancel a `pending` or `dead` row (`trigd outbox cancel`): `cancelled` is
final, the row is never sent again. A row `in_flight` cannot be cancelled: its request may
already have reached the endpoint, so its outcome is recorded first (cancel it again once
it is back to `pending`, or see it `delivered`/`dead`).

The retry policy is pure: it takes the attempt's outcome, the row's age, `now` and a
random source, and answers "delivered", "retry at T" or "dead because R". 2xx succeeds;
network errors, timeouts, 408, 429 and 5xx retry with exponential backoff and jitter
(about 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, then every 10 h), honouring `Retry-After`,
until `max_age` from the row's creation; any other status is dead at once (a redirect too:
it is not followed). The last retry is pulled in to the deadline, so an endpoint gets
attempts across its whole `max_age`.

Sharing the slots (`Endpoints`, `share_slots`, pure): the sender has `concurrency` slots.
Each claim hands the free ones out round-robin across endpoints with due rows, the one
served longest ago first, one slot per endpoint per pass, up to `per_endpoint_concurrency`
each. An endpoint whose last attempt failed in a way worth retrying (network error,
timeout, 408, 429, 5xx) is *failing*: it gets one attempt at a time until it answers
again, and all failing endpoints together hold at most `probe_concurrency` slots, fewer
than `concurrency`. And endpoints that have not answered since trigd started (new ones,
failing ones) together hold at most `concurrency - 1`: one slot is always left to the
endpoints that answer, even while new endpoints that turn out dead hang for their first
`timeout`. So however many endpoints are dead, a working endpoint waits for nothing but
its turn.

The per-endpoint window (`Window`, `next_window`, pure, with `now`): an endpoint that
answers starts with `per_endpoint_concurrency` slots. Each answer faster than `fast_answer`
widens its window by one, up to `max_per_endpoint`; a slower answer or a failure halves it,
down to `per_endpoint_concurrency`, at most once per `fast_answer` (the attempts in flight
when an endpoint slows down all end alike: one halving, not one per attempt). So a fast
local endpoint soon has many requests in flight on kept-alive connections, and one that
slows down or fails gives its slots back at once.

Giving way to acks (`GiveWay`, pure, with `now`): while clients send events, no endpoint's
window is wider than `concurrency_while_ingesting` (`Endpoints.slots(cap)`): a fast
endpoint, whose window has grown, keeps at most that many attempts in flight, each of them
costing the event loop steps that acks wait behind. Nothing else about sharing the slots
changes: the total stays `concurrency`, so a slow or hanging endpoint's attempts never
keep another endpoint waiting, and probes and turns come round as they do otherwise.
"""

from __future__ import annotations

import email.utils
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Final, TypeVar
from uuid import UUID, uuid5

import attrs

from daemon.core.action_models import CallWebhook
from daemon.core.durations import format_duration


class DeliveryState(StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    DEAD = "dead"
    CANCELLED = "cancelled"


class Move(StrEnum):
    CLAIM = "claim"
    SUCCEED = "succeed"
    RETRY = "retry"
    DIE = "die"
    LEASE_EXPIRED = "lease expired"
    REVIVE = "revive"
    CANCEL = "cancel"


TRANSITIONS: Final[Mapping[tuple[DeliveryState, Move], DeliveryState]] = MappingProxyType(
    {
        (DeliveryState.PENDING, Move.CLAIM): DeliveryState.IN_FLIGHT,
        (DeliveryState.IN_FLIGHT, Move.SUCCEED): DeliveryState.DELIVERED,
        (DeliveryState.IN_FLIGHT, Move.RETRY): DeliveryState.PENDING,
        (DeliveryState.IN_FLIGHT, Move.DIE): DeliveryState.DEAD,
        (DeliveryState.IN_FLIGHT, Move.LEASE_EXPIRED): DeliveryState.PENDING,
        (DeliveryState.DEAD, Move.REVIVE): DeliveryState.PENDING,
        (DeliveryState.PENDING, Move.CANCEL): DeliveryState.CANCELLED,
        (DeliveryState.DEAD, Move.CANCEL): DeliveryState.CANCELLED,
    }
)
"""Every legal move; anything else is a bug (or, for REVIVE, an operator mistake)."""


class IllegalMove(Exception):
    """A move the state table does not allow from the row's current state."""

    def __init__(self, state: DeliveryState, move: Move) -> None:
        allowed = sorted(m.value for (s, m) in TRANSITIONS if s == state)
        super().__init__(
            f"cannot {move.value} a delivery that is {state.value}"
            + (f" (allowed: {', '.join(allowed)})" if allowed else " (it is final)")
        )
        self.state = state
        self.move = move


def advance(state: DeliveryState, move: Move) -> DeliveryState:
    """The state after `move`, or IllegalMove."""
    try:
        return TRANSITIONS[(state, move)]
    except KeyError:
        raise IllegalMove(state, move) from None


def sources(move: Move) -> frozenset[DeliveryState]:
    """The states a move may start from (the store's `WHERE status IN (...)`)."""
    return frozenset(s for (s, m) in TRANSITIONS if m == move)


# --- the retry policy ----------------------------------------------------------------------

BACKOFF: Final[tuple[timedelta, ...]] = (
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
)
"""Wait after the 1st, 2nd, ... failed attempt; the last one repeats."""

JITTER: Final = 0.2
"""A wait is scaled by a uniform factor in [1 - JITTER, 1 + JITTER)."""

MAX_RETRY_AFTER: Final = timedelta(hours=24)
"""A `Retry-After` longer than this is clamped (the deadline clamps further)."""

RETRYABLE_STATUS: Final = frozenset({408, 429})

Random = Callable[[], float]
"""A source of uniform floats in [0, 1), e.g. `random.Random(seed).random`."""


@attrs.frozen
class AttemptOutcome:
    """What one attempt produced: a status (and Retry-After), or a transport error."""

    status_code: int | None = None
    retry_after: str | None = None  # the raw header value
    error: str | None = None  # network error or timeout, when there was no response

    def __attrs_post_init__(self) -> None:
        if (self.status_code is None) == (self.error is None):
            raise ValueError("an attempt has either a status code or an error")


@attrs.frozen
class Delivered:
    pass


@attrs.frozen
class RetryAt:
    at: datetime
    reason: str


@attrs.frozen
class Dead:
    reason: str


Decision = Delivered | RetryAt | Dead


def describe(outcome: AttemptOutcome) -> str:
    """One line for `last_error` and the failed event's reason."""
    if outcome.error is not None:
        return outcome.error
    return f"HTTP {outcome.status_code}"


def is_success(status_code: int) -> bool:
    return 200 <= status_code < 300


def is_retryable(status_code: int) -> bool:
    return status_code in RETRYABLE_STATUS or 500 <= status_code < 600


def backoff(failures: int, random: Random) -> timedelta:
    """The jittered wait after the `failures`-th failed attempt (1-based)."""
    if failures < 1:
        raise ValueError(f"failures must be at least 1, not {failures}")
    base = BACKOFF[min(failures, len(BACKOFF)) - 1]
    return base * (1 - JITTER + 2 * JITTER * random())


def parse_retry_after(value: str | None, now: datetime) -> timedelta | None:
    """`Retry-After` as a wait: delay-seconds or an HTTP date; None when absent or invalid."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return min(timedelta(seconds=int(text)), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(when - now, timedelta(0)), MAX_RETRY_AFTER)


def decide(
    outcome: AttemptOutcome,
    *,
    failures: int,
    created: datetime,
    now: datetime,
    max_age: timedelta,
    random: Random,
) -> Decision:
    """Where a row goes after an attempt. `failures` counts this attempt if it failed."""
    if outcome.status_code is not None:
        if is_success(outcome.status_code):
            return Delivered()
        if not is_retryable(outcome.status_code):
            note = " (redirects are not followed)" if 300 <= outcome.status_code < 400 else ""
            return Dead(f"{describe(outcome)}{note}: not retried")
    reason = describe(outcome)
    deadline = created + max_age
    if now >= deadline:
        return Dead(f"{reason}; gave up after {failures} attempts in {format_duration(max_age)}")
    wait = parse_retry_after(outcome.retry_after, now) if outcome.status_code else None
    if wait is None:
        wait = backoff(failures, random)
    return RetryAt(min(now + wait, deadline), reason)


ACTION_EVENT_NAMESPACE: Final = UUID("0d1f5a8e-2b7c-5e43-9c61-4a8f3e2d1b70")
"""Never change it: ids derived from it are referenced by stored events."""


def action_triggered_event_id(invocation: UUID) -> UUID:
    """The id of the `prefect.automation.action.triggered` event of one TriggeredAction,
    derived from its id, so its executed/failed event can `follow` it without a lookup.
    acting.py must give the action.triggered event this id."""
    return uuid5(ACTION_EVENT_NAMESPACE, str(invocation))


# --- sharing the slots across endpoints ---------------------------------------------------

Endpoint = str | None
"""A webhook's scheme://host:port; None is the one queue of actions that make no request."""

T = TypeVar("T")


def endpoint_answered(outcome: AttemptOutcome) -> bool:
    """Whether an attempt that reached for the endpoint shows it working: it answered, with
    a status not worth retrying (a network error, a timeout, 408, 429 or 5xx: failing)."""
    return outcome.status_code is not None and not is_retryable(outcome.status_code)


@attrs.frozen
class WindowPolicy:
    """How an endpoint's window moves (`[delivery]` settings)."""

    floor: int  # per_endpoint_concurrency: where a window starts, and its least
    ceiling: int  # max_per_endpoint: its most
    fast: timedelta  # fast_answer: an answer quicker than this widens it

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.floor <= self.ceiling:
            raise ValueError("WindowPolicy: needs 1 <= floor <= ceiling")


@attrs.frozen
class Window:
    """How many attempts one endpoint may have in flight, and when it last shrank."""

    size: int
    shrunk: datetime | None = None


def next_window(
    window: Window,
    policy: WindowPolicy,
    *,
    answered: bool | None,
    latency: timedelta | None,
    now: datetime,
) -> Window:
    """The window after an attempt ended at `now`: +1 for an answer (`endpoint_answered`)
    within `policy.fast`; halved for a slower answer or a failure, unless it already
    halved less than `policy.fast` ago; unchanged when the attempt never reached the
    endpoint (None). Always within the policy's floor and ceiling."""
    size = min(max(window.size, policy.floor), policy.ceiling)
    if answered is None:
        return Window(size, window.shrunk)
    if answered and latency is not None and latency <= policy.fast:
        return Window(min(policy.ceiling, size + 1), window.shrunk)
    if window.shrunk is not None and now - window.shrunk < policy.fast:
        return Window(size, window.shrunk)
    return Window(max(policy.floor, size // 2), now)


@attrs.frozen
class Slots:
    """What one claim may hand out: a snapshot of the sender's `Endpoints`."""

    free: int  # slots free, all endpoints
    per_endpoint: int  # an endpoint's window, unless `windows` says otherwise
    probes_free: int = 0  # of those, how many failing endpoints may take
    busy: Mapping[Endpoint, int] = attrs.field(factory=dict)  # in flight per endpoint
    failing: Collection[Endpoint] = frozenset()
    turns: Mapping[Endpoint, int] = attrs.field(factory=dict)  # when each was last served
    # endpoints that answered and are not failing; None: trust every endpoint
    trusted: Collection[Endpoint] | None = None
    untrusted_free: int = 0  # slots free for the endpoints not trusted
    windows: Mapping[Endpoint, int] = attrs.field(factory=dict)  # widened per endpoint

    def room(self, endpoint: Endpoint) -> int:
        """How many more this endpoint may have in flight, leaving the others aside."""
        if endpoint in self.failing:
            return 0 if self.probes_free <= 0 else max(0, 1 - self.busy.get(endpoint, 0))
        if not self.is_trusted(endpoint) and self.untrusted_free <= 0:
            return 0
        window = self.windows.get(endpoint, self.per_endpoint)
        return max(0, window - self.busy.get(endpoint, 0))

    def is_trusted(self, endpoint: Endpoint) -> bool:
        return self.trusted is None or endpoint in self.trusted


def share_slots(due: Mapping[Endpoint, Sequence[T]], slots: Slots) -> list[T]:
    """Which due rows to claim. `due` holds each endpoint's due rows, oldest first, the
    endpoints in the order of their oldest due row. Round-robin: in each pass every
    endpoint with room gets one row, the endpoints served longest ago first (never served:
    first, oldest due row first), until the free slots or the rows run out; failing
    endpoints only while probe slots are left, endpoints not trusted only while slots for
    them are left."""
    order = sorted(due, key=lambda endpoint: slots.turns.get(endpoint, -1))
    room = {endpoint: min(len(due[endpoint]), slots.room(endpoint)) for endpoint in order}
    taken: Counter[Endpoint] = Counter()
    free, probes, untrusted = slots.free, slots.probes_free, slots.untrusted_free
    chosen: list[T] = []
    progress = True
    while free > 0 and progress:
        progress = False
        for endpoint in order:
            if free <= 0:
                break
            if taken[endpoint] >= room[endpoint]:
                continue
            if endpoint in slots.failing and probes <= 0:
                continue
            if not slots.is_trusted(endpoint):
                if untrusted <= 0:
                    continue
                untrusted -= 1
            if endpoint in slots.failing:
                probes -= 1
            chosen.append(due[endpoint][taken[endpoint]])
            taken[endpoint] += 1
            free -= 1
            progress = True
    return chosen


class Endpoints:
    """The sender's book of slots: what is in flight where, which endpoints are failing,
    and whose turn it is. Changed only from the sender's trio task; `slots()` is the
    snapshot a claim (in the store's thread) works from."""

    def __init__(
        self,
        *,
        concurrency: int,
        per_endpoint: int,
        probes: int,
        failing: Iterable[Endpoint] = (),
        window: WindowPolicy | None = None,
    ) -> None:
        """`window` None: every endpoint keeps `per_endpoint` slots (no widening)."""
        self.concurrency = concurrency
        self.per_endpoint = per_endpoint
        self.probes = probes
        self._policy = window or WindowPolicy(per_endpoint, per_endpoint, timedelta(0))
        self._windows: dict[Endpoint, Window] = {}
        self._busy: Counter[Endpoint] = Counter()
        self._failing: set[Endpoint] = set(failing)
        self._answered: set[Endpoint] = {None}  # actions without a request always "answer"
        self._turns: dict[Endpoint, int] = {}
        self._served = 0

    @property
    def in_flight(self) -> int:
        return self._busy.total()

    @property
    def failing(self) -> frozenset[Endpoint]:
        return frozenset(self._failing)

    def busy(self, endpoint: Endpoint) -> int:
        return self._busy[endpoint]

    def probes_in_flight(self) -> int:
        return sum(self._busy[endpoint] for endpoint in self._failing)

    def trusted(self) -> frozenset[Endpoint]:
        """Endpoints that answered since trigd started and are not failing now."""
        return frozenset(self._answered - self._failing)

    def untrusted_in_flight(self) -> int:
        trusted = self.trusted()
        return sum(n for endpoint, n in self._busy.items() if endpoint not in trusted)

    def slots(self, cap: int | None = None) -> Slots:
        """What a claim may hand out now; `cap` (`GiveWay.cap`): no endpoint's window
        wider than that meanwhile (its widening waits). The total stays `concurrency`:
        endpoints keep each other's slots only as they do without a cap."""
        per_endpoint = self.per_endpoint
        windows = {endpoint: w.size for endpoint, w in self._windows.items()}
        if cap is not None:
            per_endpoint = min(per_endpoint, cap)
            windows = {endpoint: min(size, cap) for endpoint, size in windows.items()}
        return Slots(
            free=self.concurrency - self.in_flight,
            per_endpoint=per_endpoint,
            probes_free=self.probes - self.probes_in_flight(),
            busy=dict(self._busy),
            failing=frozenset(self._failing),
            turns=dict(self._turns),
            trusted=self.trusted(),
            untrusted_free=max(1, self.concurrency - 1) - self.untrusted_in_flight(),
            windows=windows,
        )

    def held_back(self, cap: int | None) -> bool:
        """Whether `cap` keeps an endpoint with attempts in flight below its own window:
        then the sender claims again once ingest goes quiet, without waiting for another
        wake-up."""
        if cap is None:
            return False
        return any(
            n >= cap and endpoint not in self._failing and self.window(endpoint) > n
            for endpoint, n in self._busy.items()
        )

    def window(self, endpoint: Endpoint) -> int:
        """The endpoint's window now (`per_endpoint` until an attempt moved it)."""
        found = self._windows.get(endpoint)
        return self.per_endpoint if found is None else found.size

    def started(self, endpoints: Iterable[Endpoint]) -> None:
        """Attempts began for these endpoints, one entry each, in the order `share_slots`
        picked them: each takes its turn, the last one picked having the latest turn."""
        for endpoint in endpoints:
            self._busy[endpoint] += 1
            self._served += 1
            self._turns[endpoint] = self._served

    def mark_failing(self, endpoint: Endpoint) -> None:
        """Known to be failing already (the store says so at start-up)."""
        self._failing.add(endpoint)

    def finished(
        self,
        endpoint: Endpoint,
        answered: bool | None,
        *,
        latency: timedelta | None = None,
        now: datetime | None = None,
    ) -> bool:
        """An attempt ended: its slot frees up, and the endpoint is failing or not as the
        attempt showed (`endpoint_answered`; None: it never reached the endpoint); with
        `now`, its window moves (`next_window`, `latency` the answer's). True when this
        changed whether the endpoint is failing."""
        self._busy[endpoint] -= 1
        if self._busy[endpoint] <= 0:
            del self._busy[endpoint]
        if now is not None and endpoint is not None:
            before = self._windows.get(endpoint, Window(self.per_endpoint))
            self._windows[endpoint] = next_window(
                before, self._policy, answered=answered, latency=latency, now=now
            )
        if answered:
            self._answered.add(endpoint)
        if answered is None or answered == (endpoint not in self._failing):
            return False
        if answered:
            self._failing.discard(endpoint)
        else:
            self._failing.add(endpoint)
        return True


@attrs.frozen
class GiveWay:
    """Deliveries give way to acks: while clients send events (an evaluator batch began
    less than `quiet_after` seconds ago), at most `while_ingesting` attempts in flight to
    any one endpoint. Each attempt in flight costs the event loop steps that every ack
    waits behind; attempts already in flight go on, and once no batch has begun for
    `quiet_after` the windows are their own again. Times are seconds of the event loop's
    clock."""

    while_ingesting: int
    quiet_after: float

    def quiet_at(self, batch_begun: float | None) -> float | None:
        """When ingest counts as quiet, given when the last batch began (None: never)."""
        return None if batch_begun is None else batch_begun + self.quiet_after

    def cap(self, batch_begun: float | None, now: float) -> int | None:
        """The most attempts in flight to one endpoint now; None: its own window."""
        quiet = self.quiet_at(batch_begun)
        return self.while_ingesting if quiet is not None and now < quiet else None


READS_FILES: Final = ("file:", "credential:")
"""References whose resolution reads a file (`daemon.core.references`)."""


def renders_inline(action: CallWebhook) -> bool:
    """Whether a request of `action` is cheap enough to make on the event loop rather than
    in a worker thread: its payload has no statement (`{%`: no loop, however the sandbox
    caps it) and no header or secret reads a file. A thread hand-off costs more than such
    a render; a file read may block on a slow disk, a long loop would hold every
    delivery."""
    if action.payload and "{%" in action.payload:
        return False
    written = [*action.headers.values(), *([action.secret] if action.secret else [])]
    return not any(value.startswith(READS_FILES) for value in written)
