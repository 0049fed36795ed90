"""Who may hold one of ingest's sockets: pending handshakes, established websockets, peers.

Without I/O, so the rules can be read and tested in one place; ``daemon.runtime.ingest`` does the
sockets and the waiting.

Theory of operation. A socket is admitted (``ConnectionSlots.admit``) right after
``accept``, before a byte of it is read, into one of two pools:

* **pending** (``max_pending_handshakes``): from accept until the handshake is over (the
  HTTP upgrade and, for a subprotocol client, its auth message), at most
  ``handshake_timeout``;
* **established** (``max_connections``): from then until the websocket closes. A socket
  moves from pending to established (``establish``) only once its handshake is complete,
  so clients that upgrade and then say nothing, or never finish the upgrade, can take
  pending slots only, never those of the clients already streaming events.

Per peer (``peer_of``: the IPv4 address, or the /64 of an IPv6 one, since one IPv6 host
commonly owns a whole /64), pending and established together are bounded by
``max_connections_per_peer``, so one host cannot take every slot of either pool.

When the pending pool is full, a newcomer is refused at once (its socket closed without
being read) rather than queued: a queue of sockets nobody reads is exactly what an
attacker would fill. One exception keeps a flood from one host from locking others out
even when ``max_connections_per_peer`` is as large as the pool: a newcomer whose peer holds
at least two pending slots fewer than the peer holding the most takes that peer's oldest
pending slot (that socket is dropped). So a host flooding half-open upgrades ends up with
an equal share of the pool at most, and a legitimate client's handshake, which takes a
couple of round trips, is not displaced by it.

Idle websockets are the other way to hold slots: ``idle_deadline`` says when an established
one that sent nothing for ``idle_timeout`` is closed.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address
from typing import Final

import attrs

IPV6_PREFIX: Final = 64  # an IPv6 peer is its /64: one host commonly holds all of it


def peer_of(address: str) -> str:
    """The key the per-peer bound counts under: an IPv4 address as it is (an IPv4-mapped
    IPv6 one unwrapped), an IPv6 one as its /64; anything else (a Unix socket path) as is."""
    try:
        ip = ip_address(address.partition("%")[0])  # a scoped IPv6 address: drop the zone
    except ValueError:
        return address
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if isinstance(ip, IPv4Address):
        return str(ip)
    return str(IPv6Network((ip, IPV6_PREFIX), strict=False))


class State(Enum):
    PENDING = "pending"
    ESTABLISHED = "established"
    RELEASED = "released"


@attrs.define(eq=False)
class Slot:
    """One admitted socket's place; ``state`` says in which pool, if any."""

    peer: str
    state: State = State.PENDING


@attrs.frozen
class Admitted:
    slot: Slot
    evicted: Slot | None = None
    """A pending handshake of the peer holding the most, dropped to make room."""


class Why(Enum):
    PER_PEER = "max_connections_per_peer"
    PENDING_FULL = "max_pending_handshakes"


@attrs.frozen
class Refused:
    peer: str
    why: Why

    def describe(self) -> str:
        if self.why is Why.PER_PEER:
            return f"{self.peer} already holds max_connections_per_peer connections"
        return "max_pending_handshakes handshakes are already in progress"


@attrs.define
class ConnectionSlots:
    """The two pools and the per-peer counts; every method is O(1) except an eviction,
    which looks at each peer with a pending handshake (at most ``max_pending`` of them)."""

    max_pending: int
    max_established: int
    max_per_peer: int
    established: int = 0
    _pending: dict[str, deque[Slot]] = attrs.Factory(dict)  # per peer, oldest first
    _pending_count: int = 0
    _per_peer: dict[str, int] = attrs.Factory(dict)  # pending + established

    @property
    def pending(self) -> int:
        return self._pending_count

    def held_by(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)

    def admit(self, peer: str) -> Admitted | Refused:
        """A socket from ``peer`` was just accepted: where it goes, or why not."""
        if self.held_by(peer) >= self.max_per_peer:
            return Refused(peer, Why.PER_PEER)
        evicted = None
        if self._pending_count >= self.max_pending:
            evicted = self._evictable(len(self._pending.get(peer, ())))
            if evicted is None:
                return Refused(peer, Why.PENDING_FULL)
            self._drop(evicted)
        slot = Slot(peer)
        self._pending.setdefault(peer, deque()).append(slot)
        self._pending_count += 1
        self._per_peer[peer] = self.held_by(peer) + 1
        return Admitted(slot, evicted)

    def _evictable(self, newcomer_holds: int) -> Slot | None:
        """The oldest pending slot of the peer holding the most, when it holds at least two
        more than the newcomer's peer (so an eviction always evens the shares out)."""
        hog = max(self._pending.values(), key=len)
        return hog[0] if len(hog) >= newcomer_holds + 2 else None

    def has_room(self) -> bool:
        """Whether a handshake finishing now would find an established slot."""
        return self.established < self.max_established

    def establish(self, slot: Slot) -> bool:
        """Move a pending slot whose handshake is complete to the established pool; False
        (and nothing changes) when that pool is full or the slot is no longer pending."""
        if slot.state is not State.PENDING or not self.has_room():
            return False
        self._remove_pending(slot)
        slot.state = State.ESTABLISHED
        self.established += 1
        return True

    def release(self, slot: Slot) -> bool:
        """The socket is closed; True when this freed an established slot. Idempotent (an
        evicted slot was released when it was evicted)."""
        was = slot.state
        self._drop(slot)
        return was is State.ESTABLISHED

    def _drop(self, slot: Slot) -> None:
        if slot.state is State.RELEASED:
            return
        if slot.state is State.PENDING:
            self._remove_pending(slot)
        else:
            self.established -= 1
        slot.state = State.RELEASED
        left = self._per_peer[slot.peer] - 1
        if left:
            self._per_peer[slot.peer] = left
        else:
            del self._per_peer[slot.peer]

    def _remove_pending(self, slot: Slot) -> None:
        queue = self._pending[slot.peer]
        queue.remove(slot)  # at most max_per_peer long
        if not queue:
            del self._pending[slot.peer]
        self._pending_count -= 1


def idle_deadline(waiting_since: float | None, now: float, idle_timeout: float) -> float:
    """When a connection becomes idle: ``idle_timeout`` after the reader started waiting for
    the client's next bytes (``waiting_since``). While the reader is not waiting on the
    client (it is handing frames on, or stopped because evaluation is behind), the
    connection is busy, not idle: its deadline is ``idle_timeout`` from ``now``, to be
    looked at again then."""
    return (now if waiting_since is None else waiting_since) + idle_timeout
