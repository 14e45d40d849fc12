"""Two robot sink entries addressing one robot (session 33, item 263): warnings of two teams into
one group, split by namespace or mention rules, is a legitimate set-up. Each entry kept its own
limiter and ``robot-rate.json``, so together they sent up to 40 messages a minute: DingTalk answered
the 21st with 130101 and throttled the robot 10 minutes (a new problem paged 420 s late), WeCom
answered 45009.

Now the entries of one robot share its minute in the process: a storm through both stays within 20
a minute, a rebuilt instance (a credential file re-read) rejoins the budget instead of resetting it,
each entry's rate file holds the robot's whole minute and a restart counts each send once, and the
start says which sinks share a robot (never its token).

Simulated time (``ManualClock``) shared by the sinks and the project's DingTalk and WeCom receivers,
which enforce the robots' 20 messages a minute.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver
from eventrouter.testing.receivers.wecom import WeComReceiver
from eventrouter_sinks._alerting import RATE_FILE, WARM_UP, AlertSink, ManualClock
from eventrouter_sinks.dingtalk import DingTalkOptions, DingTalkSink
from eventrouter_sinks.wecom import WeComOptions, WeComSink

SECRET = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd"
TOKEN = "robot-token-3b9d"
KEY = "wecom-robot-key-8e21"
CORP_SECRET = "corp-s3cret-77aa"
LOGGER = "test.robot_shared"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def robot(clock: ManualClock) -> AsyncIterator[DingTalkReceiver]:
    async with DingTalkReceiver(access_token=TOKEN, secret=SECRET, clock=clock.now, wall=clock.wall) as r:
        yield r


def context(name: str, data_dir: Path | None = None) -> SinkContext:
    return SinkContext(name=name, cluster="prod", data_dir=data_dir, logger=logging.getLogger(LOGGER))


def ding(
    robot: DingTalkReceiver, clock: ManualClock, name: str, data_dir: Path | None = None, **opts: Any
) -> DingTalkSink:
    options = DingTalkOptions.model_validate({"url": robot.url, "secret": SECRET, **opts})
    return DingTalkSink(options, context(name, data_dir), clock=clock)


def alert(name: str, reason: str = "BackOff", namespace: str = "shop") -> Occurrence:
    return make_occurrence(cluster="prod", namespace=namespace, object_name=name, reason=reason)


async def started(*sinks: AlertSink[Any]) -> None:
    for sink in sinks:
        await sink.start()


async def closed(*sinks: AlertSink[Any]) -> None:
    for sink in sinks:
        await sink.aclose()


async def storm(
    sinks: Sequence[AlertSink[Any]], clock: ManualClock, seconds: int
) -> tuple[set[str], set[str]]:
    """Each sink offered a new problem every 2 loop seconds for ``seconds``, and what it answered
    RETRY offered again when due (as the engine does), until nothing is left: (offered, OK) keys."""
    offered: set[str] = set()
    ok: set[str] = set()
    retries: list[list[tuple[float, Occurrence]]] = [[] for _ in sinks]
    second = 0
    while second < seconds or any(retries):
        now = clock.now()
        for i, sink in enumerate(sinks):
            batch = [o for due, o in retries[i] if due <= now]
            retries[i] = [(due, o) for due, o in retries[i] if due > now]
            if second < seconds and second % 2 == 0:
                batch.append(alert(f"pod-{i}-{second}", namespace=f"team-{i}"))
                offered.add(batch[-1].key)
            if not batch:
                continue
            outcomes = await sink.send(batch)
            assert outcomes is not None
            for occ, out in zip(batch, outcomes, strict=True):
                assert out.kind is not OutcomeKind.REJECT, out.reason
                if out.kind is OutcomeKind.OK:
                    ok.add(occ.key)
                else:
                    retries[i].append((clock.now() + max(out.retry_after or 1.0, 0.5), occ))
        clock.advance(1.0)
        second += 1
        assert second < 3_600, "the storm never drained"
    return offered, ok


def busiest_minute(times: Sequence[float]) -> int:
    return max((sum(1 for u in times if t <= u < t + 60) for t in times), default=0)


async def test_two_dingtalk_entries_for_one_robot_share_its_minute(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """A storm of new problems through two entries, then an OOMKilling: at most 20 messages in any
    minute, never "send too fast", every occurrence delivered, and the OOMKilling paged within the
    robot's minute. Before, the entries sent 40 a minute between them; the robot answered 130101 and
    both paused 10 minutes (the OOMKilling paged 420 s late)."""
    sinks = [ding(robot, clock, "ding-0"), ding(robot, clock, "ding-1")]
    await started(*sinks)
    try:
        offered, ok = await storm(sinks, clock, 60)
        assert ok == offered
        assert 130101 not in robot.errcodes()
        oom = alert("db-0", "OOMKilling", namespace="team-0")
        at = clock.now()
        offered, ok = set(), set()
        while oom.key not in ok:
            outcomes = await sinks[0].send([oom])
            assert outcomes is not None
            if outcomes[0].kind is OutcomeKind.OK:
                ok.add(oom.key)
            else:
                clock.advance(max(outcomes[0].retry_after or 1.0, 0.5))
    finally:
        await closed(*sinks)
    paged = [m.at for m in robot.accepted if "OOMKilling" in orjson.dumps(m.payload).decode()]
    assert len(paged) == 1 and paged[0] - at <= 60.0
    assert 130101 not in robot.errcodes()
    assert busiest_minute([m.at for m in robot.accepted]) <= 20


@pytest.mark.parametrize("mode", ["robot", "app"])
async def test_two_wecom_entries_for_one_robot_or_application_share_its_minute(
    clock: ManualClock, mode: str
) -> None:
    """The same for WeCom's group robot (20 a minute per key, 45009 beyond) and for two entries of
    one application (here limited to 20 a minute): never 45009."""
    async with WeComReceiver(
        robot_key=KEY, corp_secret=CORP_SECRET, app_rate_per_minute=20, clock=clock.now
    ) as wecom:
        if mode == "robot":
            options = {"url": wecom.robot_url}
        else:
            options = {
                "url": wecom.url,
                "corp_id": wecom.corp_id,
                "corp_secret": CORP_SECRET,
                "agent_id": str(wecom.agent_id),
                "to_user": "alice",
            }
        sinks = [
            WeComSink(WeComOptions.model_validate(options), context(f"wecom-{i}"), clock=clock)
            for i in range(2)
        ]
        await started(*sinks)
        try:
            offered, ok = await storm(sinks, clock, 60)
        finally:
            await closed(*sinks)
        assert ok == offered
        assert 45009 not in wecom.errcodes()
        assert busiest_minute([m.at for m in wecom.accepted]) <= 20


async def fill_the_minute(
    a: DingTalkSink, b: DingTalkSink, clock: ManualClock, robot: DingTalkReceiver
) -> None:
    """Ten new problems through each entry at once (min_interval=0): the robot's 20 of the minute."""
    clock.advance(WARM_UP)
    for i in range(10):
        for sink in (a, b):
            outcomes = await sink.send([alert(f"web-{i}", namespace=sink.context.name)])
            assert outcomes is not None and outcomes[0].kind is OutcomeKind.OK
    assert len(robot.accepted) == 20


async def test_an_entry_rebuilt_on_reload_keeps_the_robots_shared_minute(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """The engine rebuilds an entry whose credential file changed: the new instance starts while
    the old one stands, then takes over. The robot's minute is full (10 + 10): the rebuilt entry's
    new problem waits for it, with no request to the robot. Before, it knew only its own 10 sends
    and sent the 21st: 130101."""
    a = ding(robot, clock, "ding-a", min_interval=0)
    b = ding(robot, clock, "ding-b", min_interval=0)
    await started(a, b)
    rebuilt = ding(robot, clock, "ding-b", min_interval=0, max_send_wait=0)
    try:
        await fill_the_minute(a, b, clock, robot)
        await rebuilt.start()
        await b.aclose()
        rebuilt.take_over(b)
        asked = len(robot.requests)
        outcomes = await rebuilt.send([alert("db-0", "OOMKilling")])
        assert outcomes is not None and outcomes[0].kind is OutcomeKind.RETRY and outcomes[0].held
        assert "rate limit" in outcomes[0].reason
        assert len(robot.requests) == asked
        clock.advance(60)
        outcomes = await rebuilt.send([alert("db-0", "OOMKilling")])
        assert outcomes is not None and outcomes[0].kind is OutcomeKind.OK
    finally:
        await closed(a, b, rebuilt)
    assert 130101 not in robot.errcodes()


async def test_each_entrys_rate_file_holds_the_robots_minute_and_a_restart_counts_it_once(
    robot: DingTalkReceiver, clock: ManualClock, tmp_path: Path
) -> None:
    """Two entries, each with its folder in the data dir, fill the robot's minute; the router
    restarts. Each file holds all 20 sends; started again, the entries share a minute of 20 sends
    (not 40: each send in both files counted once), and a new problem waits for it. Before, each
    file held its own 10: restarted, the entries sent 20 more at once and got 130101."""
    dirs = [tmp_path / "ding-a", tmp_path / "ding-b"]
    for folder in dirs:
        folder.mkdir()
    a = ding(robot, clock, "ding-a", dirs[0], min_interval=0)
    b = ding(robot, clock, "ding-b", dirs[1], min_interval=0)
    await started(a, b)
    try:
        await fill_the_minute(a, b, clock, robot)
    finally:
        await closed(a, b)
    for folder in dirs:
        assert len(orjson.loads((folder / RATE_FILE).read_bytes())["sent"]) == 20
    a2 = ding(robot, clock, "ding-a", dirs[0], min_interval=0, max_send_wait=0)
    b2 = ding(robot, clock, "ding-b", dirs[1], min_interval=0, max_send_wait=0)
    await started(a2, b2)
    try:
        assert len(a2.limiter.history()[0]) == 20
        asked = len(robot.requests)
        for sink in (a2, b2):
            outcomes = await sink.send([alert("db-0", "OOMKilling", namespace=sink.context.name)])
            assert outcomes is not None and outcomes[0].kind is OutcomeKind.RETRY and outcomes[0].held
        assert len(robot.requests) == asked
    finally:
        await closed(a2, b2)
    assert 130101 not in robot.errcodes()


async def test_the_start_says_which_entries_share_a_robot_never_its_token(
    robot: DingTalkReceiver, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Logged once the second entry joins, naming both sinks and the pace they share (the lowest
    rate_per_minute of theirs), without the access_token or the secret. Another robot (another
    token) is paced on its own."""
    a = ding(robot, clock, "ding-a")
    b = ding(robot, clock, "ding-b", rate_per_minute=10)
    async with DingTalkReceiver(
        access_token="other-robot-token", secret=SECRET, clock=clock.now, wall=clock.wall
    ) as other:
        c = ding(other, clock, "ding-c")
        with caplog.at_level(logging.INFO, logger=LOGGER):
            await started(a, b, c)
        try:
            assert a.limiter is b.limiter and c.limiter is not a.limiter
        finally:
            await closed(a, b, c)
    said = [r.getMessage() for r in caplog.records if "share" in r.getMessage()]
    assert len(said) == 1
    assert "ding-a" in said[0] and "ding-b" in said[0] and "10 messages a minute" in said[0]
    assert "ding-c" not in said[0]
    assert all(TOKEN not in r.getMessage() and SECRET not in r.getMessage() for r in caplog.records)


async def test_an_entry_replaced_before_its_start_still_reads_the_saved_minute(
    robot: DingTalkReceiver, clock: ManualClock, tmp_path: Path
) -> None:
    """The engine swaps an instance that never started (its start failed, then its credential file
    changed) for the rebuilt one, which takes over before its own start. The instance replaced had
    read no rate file; the rebuilt one took over "the file's minute" from it and never read the
    file: restarted in a full minute, it sent at once. Now it reads the file at its start."""
    a = ding(robot, clock, "ding-a", tmp_path, min_interval=0)
    await started(a)
    clock.advance(WARM_UP)
    try:
        for i in range(20):  # one entry alone: the robot's minute, all in its file
            outcomes = await a.send([alert(f"web-{i}")])
            assert outcomes is not None and outcomes[0].kind is OutcomeKind.OK
    finally:
        await closed(a)
    never = ding(robot, clock, "ding-a", tmp_path, min_interval=0, max_send_wait=0)
    rebuilt = ding(robot, clock, "ding-a", tmp_path, min_interval=0, max_send_wait=0)
    try:
        rebuilt.take_over(never)
        await rebuilt.start()
        asked = len(robot.requests)
        outcomes = await rebuilt.send([alert("db-0", "OOMKilling")])
        assert outcomes is not None and outcomes[0].kind is OutcomeKind.RETRY and outcomes[0].held
        assert len(robot.requests) == asked
    finally:
        await closed(never, rebuilt)
    assert 130101 not in robot.errcodes()
