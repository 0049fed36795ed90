"""Who may hold ingest's sockets (daemon/core/slots.py): the pools, the per-peer bound, eviction.

Pure: no sockets and no clock. The same rules against real sockets are in
tests/runtime/test_connection_limits.py.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from daemon.core.slots import (
    Admitted,
    ConnectionSlots,
    Refused,
    Slot,
    State,
    Why,
    idle_deadline,
    peer_of,
)


def table(pending: int = 4, established: int = 8, per_peer: int = 4) -> ConnectionSlots:
    return ConnectionSlots(max_pending=pending, max_established=established, max_per_peer=per_peer)


def admitted(slots: ConnectionSlots, peer: str) -> Slot:
    admission = slots.admit(peer)
    assert isinstance(admission, Admitted), admission
    return admission.slot


@pytest.mark.parametrize(
    ("address", "peer"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # IPv4 on a dual-stack socket
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),  # same /64: same peer
        ("fe80::1%eth0", "fe80::/64"),
        ("/run/trigd.sock", "/run/trigd.sock"),
        ("", ""),
    ],
)
def test_a_peer_is_an_ipv4_address_or_an_ipv6_64(address: str, peer: str) -> None:
    assert peer_of(address) == peer


def test_the_per_peer_bound_counts_pending_and_established_together() -> None:
    slots = table(pending=4, established=8, per_peer=3)
    first = admitted(slots, "a")
    assert slots.establish(first)
    admitted(slots, "a")
    admitted(slots, "a")
    assert slots.admit("a") == Refused("a", Why.PER_PEER)
    assert isinstance(slots.admit("b"), Admitted)  # another peer is not affected
    assert slots.release(first)
    assert isinstance(slots.admit("a"), Admitted)


def test_a_full_pending_pool_refuses_a_peer_with_as_much_as_the_others() -> None:
    slots = table(pending=4, per_peer=4)
    for peer in "abcd":
        admitted(slots, peer)
    assert slots.admit("e") == Refused("e", Why.PENDING_FULL)
    assert slots.admit("a") == Refused("a", Why.PENDING_FULL)
    assert slots.pending == 4


def test_a_peer_holding_the_pending_pool_gives_up_its_oldest_handshake() -> None:
    slots = table(pending=4, per_peer=16)
    hog = [admitted(slots, "hog") for _ in range(4)]
    assert slots.admit("hog") == Refused("hog", Why.PENDING_FULL)  # no more for itself
    admission = slots.admit("client")
    assert isinstance(admission, Admitted)
    assert admission.evicted is hog[0]
    assert hog[0].state is State.RELEASED
    assert not slots.release(hog[0])  # its task ends later: nothing left to release
    assert (slots.pending, slots.held_by("hog"), slots.held_by("client")) == (4, 3, 1)


def test_eviction_stops_once_the_shares_are_even() -> None:
    slots = table(pending=4, per_peer=16)
    for _ in range(4):
        admitted(slots, "hog")
    evictions = 0
    while isinstance(admission := slots.admit("client"), Admitted):
        evictions += admission.evicted is not None
    assert (slots.held_by("hog"), slots.held_by("client"), evictions) == (2, 2, 2)


def test_a_flood_of_half_open_handshakes_never_locks_another_peer_out() -> None:
    """64 handshakes from one address, renewed as fast as it likes: a client from another
    one still gets a pending slot each time, and then an established one."""
    slots = table(pending=16, established=64, per_peer=16)
    for _ in range(64):
        slots.admit("attacker")
    for _ in range(20):  # the client comes and goes; the attacker refills in between
        client = admitted(slots, "client")
        for _ in range(64):
            slots.admit("attacker")
        assert client.state is State.PENDING
        assert slots.establish(client)
        slots.release(client)
    assert slots.held_by("attacker") == 15  # the client's slot, freed since


def test_only_pending_slots_are_established_and_only_while_there_is_room() -> None:
    slots = table(pending=4, established=1, per_peer=4)
    one, two = admitted(slots, "a"), admitted(slots, "b")
    assert slots.has_room()
    assert slots.establish(one)
    assert not slots.establish(one)  # already
    assert not slots.has_room()
    assert not slots.establish(two)
    assert two.state is State.PENDING
    assert slots.release(one)
    assert slots.establish(two)
    assert (slots.pending, slots.established) == (0, 1)


def test_an_established_slot_is_never_evicted() -> None:
    slots = table(pending=2, established=8, per_peer=8)
    done = admitted(slots, "hog")
    assert slots.establish(done)
    admitted(slots, "hog")
    admitted(slots, "hog")
    admission = slots.admit("client")
    assert isinstance(admission, Admitted)
    assert admission.evicted is not done
    assert done.state is State.ESTABLISHED


def test_idle_deadline_runs_from_when_the_reader_began_to_wait() -> None:
    assert idle_deadline(100.0, now=130.0, idle_timeout=60.0) == 160.0
    assert idle_deadline(100.0, now=170.0, idle_timeout=60.0) == 160.0  # past: idle
    # busy (not waiting for the client): not idle, look again a timeout later
    assert idle_deadline(None, now=170.0, idle_timeout=60.0) == 230.0


class SlotsMachine(RuleBasedStateMachine):
    """Any sequence of accepts, completed handshakes and closes keeps every bound."""

    def __init__(self) -> None:
        super().__init__()
        self.slots = ConnectionSlots(max_pending=3, max_established=4, max_per_peer=3)
        self.live: list[Slot] = []

    @rule(peer=st.sampled_from(["a", "b", "c", "d"]))
    def accept(self, peer: str) -> None:
        before = self.slots.held_by(peer)
        admission = self.slots.admit(peer)
        if isinstance(admission, Refused):
            assert admission.why is Why.PER_PEER or self.slots.pending == 3
            return
        assert self.slots.held_by(peer) == before + 1
        self.live.append(admission.slot)
        if admission.evicted is not None:
            assert admission.evicted.peer != peer
            self.live.remove(admission.evicted)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(min_value=0), done=st.booleans())
    def handshake_or_close(self, index: int, done: bool) -> None:
        slot = self.live[index % len(self.live)]
        if done:
            could = slot.state is State.PENDING and self.slots.has_room()
            assert self.slots.establish(slot) == could
        else:
            self.slots.release(slot)
            self.live.remove(slot)
            assert slot.state is State.RELEASED

    @invariant()
    def bounds_hold(self) -> None:
        pending = [s for s in self.live if s.state is State.PENDING]
        established = [s for s in self.live if s.state is State.ESTABLISHED]
        assert len(self.live) == len(pending) + len(established)
        assert self.slots.pending == len(pending) <= 3
        assert self.slots.established == len(established) <= 4
        for peer in "abcd":
            held = sum(s.peer == peer for s in self.live)
            assert self.slots.held_by(peer) == held <= 3


TestSlotsMachine = SlotsMachine.TestCase
TestSlotsMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
