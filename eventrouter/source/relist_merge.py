"""Relists that happen together are handed on in one time order.

Each ``--namespace`` value has a watcher of its own. At start-up, and after an API server outage
(every watch answered 410 Gone), they all relist at once. Each sorted only its own list
(``relist_order.py``): a Loki stream spanning namespaces got a small namespace's hours first and a
large one's older entries after them, over an hour behind (stamped at receipt); and each kept 500
occurrences in memory, 120 namespaces 60,000 (~250 MiB against the chart's 256 MiB limit).

Relists that overlap now form one round: one ``RelistOrder`` (one temporary file, the router's one
``RelistBudget``), handed on oldest-first across their namespaces once every one of them has listed,
at the sinks' pace (``Fanout.wait_for_room`` before each chunk, as one intake); each namespace's
watch then starts from its own list's resourceVersion. A round takes the relists that begin while it
still collects, and waits, at most ``gather`` seconds from its start, for the watchers that are
neither watching nor in a round: after an outage each reconnects after its own jittered backoff and
gets its 410 then. A watcher the API server refuses for good (401, 403, 404) is not waited for, nor
one not healthy (a watch open, a list complete) within the last ``gather`` seconds, nor one that has
never been healthy once a list or watch of it failed other than with a 410: one namespace answering
500 for ever held every round, at start-up and after each routine 410 elsewhere, for the whole
``gather`` (65 s), and with a short watch window the others never got back to watching. Such a
watcher relists in a round of its own, and a round past its deadline takes no one new and moves a
member that has no page yet to a round of its own: a failing list re-joining cannot hold it. A
relist alone (a 410 in one namespace while the others watch; the cluster-wide watch) is a round of
one and goes on as soon as its list is complete, as before.

A member whose list fails leaves the round: its rows are discarded (never handed on) and its uids
returned to be forgotten by its tracker, so its next relist, in this round if it still collects,
delivers them. A hand-on that fails fails the round: every member forgets what was not handed on
and relists.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable

from eventrouter.record import Occurrence
from eventrouter.source.relist_order import RelistBudget, RelistOrder

__all__ = ["Member", "RelistFailed", "RelistMerge", "Seat"]

HandOn = Callable[[RelistOrder, str, Callable[[], None]], Awaitable[None]]
"""What hands a round's order on: ``(order, what it holds, progress)``; ``progress`` marks every
member's watcher as progressing (for /healthz)."""


class RelistFailed(Exception):
    """The round this relist was in failed while another member handed it on: relist."""


class _State(enum.Enum):
    COLLECTING = "collecting"
    HANDING = "handing"
    DONE = "done"
    FAILED = "failed"


class Seat:
    """One watcher as the rounds see it."""

    def __init__(self, merge: RelistMerge, where: str, progress: Callable[[], None]) -> None:
        self.merge = merge
        self.where = where
        self.progress = progress
        self.watching = False  # a watch stream is open
        self.refused = False  # its last failure was an answer a retry soon will not change
        self.member: Member | None = None
        # time.monotonic() it was last healthy (a watch open, a list complete); until then, when it
        # started: it is given one gathering window to list, lost at its first failure (not a 410).
        self.healthy_at = time.monotonic()
        self.ever_healthy = False

    def recent(self, now: float) -> bool:
        """Healthy within the last gathering window: a round may wait for it, or take its relist."""
        return now - self.healthy_at < self.merge.gather

    @property
    def awaited(self) -> bool:
        """A round still collecting waits for this watcher: its relist may come soon."""
        return (
            not self.watching and not self.refused and self.member is None and self.recent(time.monotonic())
        )

    def healthy(self) -> None:
        self.healthy_at = time.monotonic()
        self.ever_healthy = True

    def join(self, hand_on: HandOn) -> Member:
        """Its relist begins: into the round still collecting, or a new one."""
        return self.merge.join(self, hand_on)

    def watch_opened(self) -> None:
        self.watching = True
        self.refused = False
        self.healthy()
        self.merge.changed()

    def watch_closed(self) -> None:
        if self.watching:
            self.healthy()  # healthy till now: an outage's reconnects are gathered
        self.watching = False

    def failed(self, *, refused: bool, expired: bool = False) -> None:
        self.refused = refused
        if not expired and not self.ever_healthy:
            self.healthy_at = float("-inf")  # failing from the start: not waited for
        self.merge.changed()


class Member:
    """One relist in a round."""

    def __init__(self, round_: _Round, seat: Seat, index: int, hand_on: HandOn) -> None:
        self.round = round_
        self.seat = seat
        self.index = index
        self.hand_on = hand_on
        self.listing = True
        self.began = False  # a page of its list is in: its rows are in this round's order
        self.left = False
        self.lost: list[str] = []  # not handed on when the round failed

    def add(self, occ: Occurrence) -> None:
        self.began = True
        self.round.order.add(occ, self.index)

    def page_listed(self) -> None:
        """A page of this list is in: the members waiting for it progress too."""
        self.began = True
        self.round.progress()

    async def listed(self) -> None:
        """This list is complete: returns once the round has handed everything on (this member may
        be the one that does), raises when that failed."""
        self.seat.healthy()
        await self.round.listed(self)
        self.seat.healthy()

    def leave(self) -> list[str]:
        """Out of the round (done, failed or stopped): the uids this member's tracker must forget,
        never handed on. Idempotent."""
        return self.round.leave(self)


class _Round:
    def __init__(self, merge: RelistMerge, order: RelistOrder, deadline: float) -> None:
        self.merge = merge
        self.order = order
        self.deadline = deadline  # time.monotonic(): till then awaited watchers are waited for
        self.members: list[Member] = []
        self.listing = 0  # members still listing
        self.state = _State.COLLECTING
        self.failure = ""
        self._indexes = 0
        self._changed = asyncio.Event()

    def add(self, seat: Seat, hand_on: HandOn) -> Member:
        member = Member(self, seat, 0, hand_on)
        self.adopt(member)
        seat.member = member
        return member

    def adopt(self, member: Member) -> None:
        if self._indexes == 1:
            self.order.tag_members()  # a second list in this order: rows are told apart from now on
        member.round = self
        member.index = self._indexes
        self._indexes += 1
        self.members.append(member)
        self.listing += 1

    def _move_unbegun(self) -> None:
        """Past the deadline: members with no page in yet (a failing list re-joining, a request
        hanging) list on in a round of their own; they have nothing in this order."""
        moving = [m for m in self.members if m.listing and not m.began]
        if not moving or len(moving) == len(self.members):
            return  # nobody held up
        if self.merge.open is self:
            self.merge.open = None
        other = self.merge.open
        if other is None or time.monotonic() >= other.deadline:
            other = self.merge.new_round(open_=True)
        for m in moving:
            self.members.remove(m)
            self.listing -= 1
            other.adopt(m)

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def progress(self) -> None:
        for m in self.members:
            m.seat.progress()

    def describe(self) -> str:
        if len(self.members) == 1:
            return self.members[0].seat.where
        return f"{len(self.members)} namespaces relisting together"

    def _ready(self) -> bool:
        if time.monotonic() >= self.deadline:
            self._move_unbegun()
            return not self.listing
        if self.listing:
            return False
        if self.merge.open is not self:
            return True  # no one can join it any more: nothing to wait for
        return not any(seat.awaited for seat in self.merge.seats)

    def _wait(self) -> float | None:
        """How long a collecting round may sleep before it must look again (None: till a change)."""
        now = time.monotonic()
        if now >= self.deadline:
            return None  # only members that have begun listing are left to wait for
        if self.listing or self.merge.open is not self:
            return self.deadline - now  # members that have not begun by then are moved out
        wake = self.deadline
        for seat in self.merge.seats:
            if seat.awaited:  # no longer once its gathering window ends
                wake = min(wake, seat.healthy_at + self.merge.gather)
        return max(0.0, wake - now)

    async def listed(self, member: Member) -> None:
        member.listing = False
        self.listing -= 1
        self.notify()
        while True:
            if self.state is _State.DONE:
                return
            if self.state is _State.FAILED:
                raise RelistFailed(self.failure)
            if self.state is _State.COLLECTING and self._ready():
                await self._hand_on(member)
                continue
            changed = self._changed
            timeout = self._wait() if self.state is _State.COLLECTING else None
            try:
                async with asyncio.timeout(timeout):
                    await changed.wait()
            except TimeoutError:
                pass

    async def _hand_on(self, driver: Member) -> None:
        self.state = _State.HANDING
        if self.merge.open is self:
            self.merge.open = None  # relists from now on form a round of their own
        order = self.order
        try:
            if len(order):
                await driver.hand_on(order, self.describe(), self.progress)
        except BaseException as exc:
            self.state = _State.FAILED
            self.failure = (
                f"the relist handed on together with {driver.seat.where} failed: {type(exc).__name__}: {exc}"
            )
            for m in self.members:
                m.lost = order.not_handed_on(m.index)
            raise
        else:
            self.state = _State.DONE
        finally:
            order.close()
            self.notify()

    def leave(self, member: Member) -> list[str]:
        if member.left:
            return []
        member.left = True
        if member.listing:
            member.listing = False
            self.listing -= 1
        member.seat.member = None
        self.members.remove(member)
        if self.state is _State.DONE:
            return []
        if self.state is _State.FAILED:
            return member.lost
        # Its list failed, or its watcher was stopped: what it added is never handed on.
        lost = self.order.discard(member.index)
        if not self.members and self.state is _State.COLLECTING:
            if self.merge.open is self:
                self.merge.open = None
            self.order.close()
        self.notify()
        return lost


class RelistMerge:
    """Shared by the watchers of one router (relists sorted): forms the rounds."""

    def __init__(
        self,
        *,
        cluster: str,
        directory: str | None = None,
        gather: float = 60.0,
        budget: RelistBudget | None = None,
    ) -> None:
        self.cluster = cluster
        self.directory = directory
        self.gather = gather
        self.budget = budget if budget is not None else RelistBudget()
        self.seats: list[Seat] = []
        self.open: _Round | None = None  # the round still collecting

    def seat(self, where: str, progress: Callable[[], None]) -> Seat:
        seat = Seat(self, where, progress)
        self.seats.append(seat)
        return seat

    def new_round(self, *, open_: bool) -> _Round:
        order = RelistOrder(cluster=self.cluster, directory=self.directory, budget=self.budget)
        round_ = _Round(self, order, time.monotonic() + self.gather)
        if open_:
            self.open = round_
        return round_

    def join(self, seat: Seat, hand_on: HandOn) -> Member:
        if seat.member is not None:
            raise RuntimeError(f"{seat.where} is already relisting")
        now = time.monotonic()
        round_ = self.open
        if not seat.recent(now):
            # Failing longer than a round gathers: its list must not hold the others' round.
            round_ = self.new_round(open_=False)
        elif round_ is None or now >= round_.deadline:
            round_ = self.new_round(open_=True)  # one past its deadline takes no one new
        seat.refused = False
        return round_.add(seat, hand_on)

    def changed(self) -> None:
        """A watcher opened a watch or was refused: the round collecting may be ready."""
        if self.open is not None:
            self.open.notify()
