"""webhook sink: its walk (``_walk``: halving, probes, confirmation, records set aside) against
credentials refused mid-walk, a confirmation that fails a record again, a second record failing
alone after one set aside, a restart, and records the engine gives up.

Against the project's WebhookReceiver, through the engine's own Pipeline (``pipeline_for``) or a
whole Router on the project's Kubernetes API test server with a data dir."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventrouter import Occurrence, Outcome, SinkContext
from eventrouter.app import Router
from eventrouter.config import build_specs
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import SINK_DROP_REASONS, Metrics
from eventrouter.testing import event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.pipelines import Knobs, drained, pipeline_for
from eventrouter.testing.receivers.webhook import RecordedRequest, WebhookReceiver
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until
from eventrouter_sinks.webhook import WebhookOptions, WebhookSink

LOG = logging.getLogger("test.webhook.walk")
NAME = "webhook"
FAST: Knobs = {"retry_initial_backoff": 0.01, "retry_max_backoff": 0.05}
TOKEN = "tok-7Hq2-rotated-Zx81"


class Observed(WebhookSink):
    """The webhook sink as it is, its answers to the engine kept: which records it set aside."""

    def __init__(self, options: WebhookOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self.answers: list[tuple[tuple[str, int], Outcome]] = []

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        outcomes = await super().send(batch)
        assert outcomes is not None  # (a whole batch failing is raised, not answered)
        self.answers += [((o.uid, o.number), out) for o, out in zip(batch, outcomes, strict=True)]
        return outcomes

    def set_aside(self) -> set[tuple[str, int]]:
        """Every record ever answered set aside for a failure of its own (not held behind one)."""
        return {key for key, out in self.answers if out.defer and not out.held}


@asynccontextmanager
async def engine(
    options: dict[str, Any], metrics: Metrics, dead: Path, data_dir: Path | None = None, **knobs: Any
) -> AsyncIterator[tuple[Pipeline, Observed]]:
    """A running Pipeline of a webhook sink; drained and stopped on the way out."""
    sink = Observed(WebhookOptions.model_validate(options), SinkContext(NAME, "t", data_dir, LOG))
    pipeline = pipeline_for(NAME, sink, metrics, dead, **{**FAST, **knobs})
    async with drained(pipeline):
        yield pipeline, sink


def records(request: RecordedRequest) -> list[dict[str, Any]]:
    body = request.json()
    return body if isinstance(body, list) else [body]


def carried(request: RecordedRequest) -> list[tuple[str, int]]:
    return [(r["uid"], r["occurrence"]) for r in records(request)]


def taken(requests: Iterable[RecordedRequest]) -> list[tuple[str, int]]:
    """(uid, occurrence) of every record the receiver accepted, in the order it took them."""
    return [key for q in requests if q.status is not None and 200 <= q.status < 300 for key in carried(q)]


def keys(occurrences: Iterable[Occurrence]) -> list[tuple[str, int]]:
    return [(o.uid, o.number) for o in occurrences]


def aside(pipeline: Pipeline) -> set[tuple[str, int]]:
    """What the engine holds set aside (``defer``) now."""
    return {(o.uid, o.number) for _, _, o in pipeline._deferred}


def count(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


@pytest.mark.parametrize("refusals", [6, 12])
@pytest.mark.parametrize("status", [401, 403])
async def test_credentials_refused_mid_walk_set_nothing_aside_lose_nothing_and_are_logged_once_without_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int, refusals: int
) -> None:
    """mode=batch, 16 records, X/1 the 6th (a receiver's bug answers it 500) and X/2 the 12th. The
    walk: the whole batch 500, the first record alone taken, the other 15 500, then halves. From
    the first half on the receiver answers ``status`` to every request (credentials rotated at the
    endpoint; its answer quotes the Authorization header it refused) for ``refusals`` requests,
    across sends, then takes them again. A whole-destination refusal is no record's fault: nothing
    but X is ever set aside, nothing is lost or sent twice, the order is kept (X/2 behind X/1), and
    the refusal is logged once by the sink, with its reason and without the token."""
    uid = str(uuid.uuid4())
    occs = [make_occurrence(object_name=f"pod-{i}", message=f"event {i}") for i in range(16)]
    occs[5] = make_occurrence(uid=uid, object_name="x", count=1, message="poison pill")
    occs[11] = make_occurrence(uid=uid, object_name="x", count=2, message="again")
    good = [key for key in keys(occs) if key[0] != uid]
    caplog.set_level(logging.INFO)
    metrics = Metrics()
    seen = 0
    async with WebhookReceiver() as hook:

        def answer(body: bytes) -> bool:
            nonlocal seen
            seen += 1
            if seen == 3:  # the whole, its first record alone, the other 15: then the halves
                hook.fail_next(refusals, status, body=b"invalid credentials", echo=True)
            return b"poison" in body

        hook.fail_matching(answer, 500)
        options = {"url": hook.url, "bearer_token": TOKEN}
        async with engine(options, metrics, tmp_path / "dead", batch_max_events=16) as (pipeline, sink):
            for occ in occs:
                pipeline.offer(occ)
            await until(lambda: count(metrics.delivered, NAME) == 14)
            assert taken(hook.requests) == good  # once each, in order; X/2 held behind X/1
            refused = [q for q in hook.requests if q.status == status]
            assert len(refused) == refusals and len(carried(refused[0])) == 7  # from the first half on
            hook.fail_matching(None)  # the receiver's bug fixed
            await until(lambda: count(metrics.delivered, NAME) == 16)
    assert taken(hook.requests) == [*good, (uid, 1), (uid, 2)]
    assert {key for key in sink.set_aside() if key[0] != uid} == set()
    assert count(metrics.dead_lettered, NAME, "rejected") == 0
    assert count(metrics.dead_lettered, NAME, "retries_exhausted") == 0
    assert count(metrics.retries, NAME) >= 1  # (counted as retries, with the reason in the log)
    (line,) = [r.getMessage() for r in caplog.records if "our credentials refused?" in r.getMessage()]
    assert f"HTTP {status} from {hook.url}: invalid credentials" in line and "check bearer_token" in line
    assert "Authorization: ****" in line  # the receiver's echo, the token scrubbed
    assert TOKEN not in caplog.text
    assert not any(TOKEN in out.reason for _, out in sink.answers)


@pytest.mark.parametrize("mode", ["batch", "event"])
async def test_a_record_failed_again_at_a_confirmation_holds_its_events_later_occurrences_back(
    tmp_path: Path, mode: str
) -> None:
    """[A/1, B/1, B/2, c]: the receiver fails A/1 and B/1 (one bug for two payloads, or a good B/1
    caught by refused credentials twice). B/1, failed alone before, joined the suspects behind A/1
    and went with them into the confirmation after c's probe was taken; there it failed alone for
    the first time since (so not set aside) and waited for the next probe, while the confirmation
    went on and sent B/2: the receiver took B/2 before B/1. Now B/2 waits with B/1."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    a1 = make_occurrence(uid=a, object_name="a", count=1, message="poison a")
    b1 = make_occurrence(uid=b, object_name="b", count=1, message="poison b")
    b2 = make_occurrence(uid=b, object_name="b", count=2, message="b again")
    c = make_occurrence(object_name="c")
    metrics = Metrics()
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: b"poison" in body, 500)
        async with engine({"url": hook.url, "mode": mode}, metrics, tmp_path / "dead") as (pipeline, _):
            for occ in (a1, b1, b2, c):
                pipeline.offer(occ)
            # Past the confirmation (B/1's 4th request), on to A's and B's records only, retried in
            # place (item 188's Left: no other record to probe with).
            await until(lambda: sum((b, 1) in carried(q) for q in hook.requests) >= 6)
            assert (c.uid, 1) in taken(hook.requests)
            assert (b, 2) not in taken(hook.requests)  # before: taken at the confirmation, B/1 not
            hook.fail_matching(None)
            await until(lambda: count(metrics.delivered, NAME) == 4)
    got = taken(hook.requests)
    assert Counter(got) == Counter(keys([a1, b1, b2, c]))  # each once
    assert [n for u, n in got if u == b] == [1, 2]


async def test_a_record_set_aside_stays_aside_after_another_record_failed_not_retried_in_place_for_ever(
    tmp_path: Path,
) -> None:
    """One record a batch. X/1 (a receiver's bug answers it 500) fails alone twice after a success:
    set aside. Then g1 is taken and R is answered 401 twice (credentials refused for a moment, with
    a Retry-After): set aside too, as the last record of its send. X/1 came due next, failed, and as
    the endpoint had failed R since its last answer it was retried in place: alone at every attempt,
    with nothing to probe with, no request of others answered again, and the engine sending nothing
    else: g2, R and everything after were held up for ever. A record set aside and not answered
    since now stays aside."""
    x1 = make_occurrence(object_name="x", message="poison pill")
    g0, g1, g2, r = (make_occurrence(object_name=name) for name in ("g0", "g1", "g2", "r"))
    metrics = Metrics()
    # X/1 waits 0.5-1 s aside: g1 and R go in the meantime (R's wait is the Retry-After's, 2 s).
    knobs: dict[str, Any] = {"batch_max_events": 1, "retry_initial_backoff": 1.0, "retry_max_backoff": 1.0}
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: b"poison" in body, 500)
        async with engine({"url": hook.url}, metrics, tmp_path / "dead", **knobs) as (pipeline, sink):
            pipeline.offer(g0)
            await until(lambda: count(metrics.delivered, NAME) == 1)
            pipeline.offer(x1)
            await until(lambda: aside(pipeline) == {(x1.uid, 1)})
            pipeline.offer(g1)
            await until(lambda: count(metrics.delivered, NAME) == 2)
            hook.fail_next(2, 401, retry_after="2")
            pipeline.offer(r)
            await until(lambda: (r.uid, 1) in aside(pipeline))
            assert [q.status for q in hook.requests if (x1.uid, 1) in carried(q)] == [500, 500]
            await until(lambda: sum((x1.uid, 1) in carried(q) for q in hook.requests) == 3)  # due, failed
            pipeline.offer(g2)
            await until(lambda: count(metrics.delivered, NAME) == 3, timeout=5)  # before: never
            await until(lambda: count(metrics.delivered, NAME) == 4, timeout=5)  # R, once due
            assert taken(hook.requests) == keys([g0, g1, g2, r])
            hook.fail_matching(None)
            await until(lambda: count(metrics.delivered, NAME) == 5, timeout=5)
    assert taken(hook.requests) == keys([g0, g1, g2, r, x1])
    assert sink.set_aside() == {(x1.uid, 1), (r.uid, 1)}  # (R: the lone-record rule, item 190's Left)
    assert count(metrics.dead_lettered, NAME, "rejected") == 0


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="secret-token") as server:
        server.bookmark_interval = 0.2
        yield server


def router_aside(router: Router) -> set[tuple[str, int]]:
    return {(o.uid, o.number) for _, _, o in router.pipelines[0]._deferred}


def dropped(router: Router) -> float:
    return sum(count(router.metrics.dropped, NAME, reason) for reason in SINK_DROP_REASONS)


@pytest.mark.parametrize("batch", [1, 20])
@pytest.mark.parametrize("mode", ["batch", "event"])
async def test_an_event_set_aside_at_a_stop_goes_in_in_order_after_the_restart_and_holds_up_nothing(
    api: FakeApiServer, tmp_path: Path, mode: str, batch: int
) -> None:
    """A router with a data dir: the receiver refuses X/1 (its own bug); X/2 and X/3 are held
    behind it while the other events go in. A clean stop spools X's three; the next start reads
    them back first. The sink had forgotten X/1 was set aside and the endpoint had answered nothing
    yet in this run: with no record of another event to probe with, X's records were retried in
    place and every event after them waited, until the receiver took X/1. The sink now keeps the
    keys of the records it set aside in its data dir: X/1 is set aside again at once, the new
    events go in meanwhile, and once the receiver takes X/1, X's occurrences go in in order, each
    once."""
    data = tmp_path / "data"
    x_uid = ""
    async with WebhookReceiver() as hook:

        def refused(body: bytes) -> bool:
            value = orjson.loads(body)
            return any(
                r["uid"] == x_uid and r["occurrence"] == 1
                for r in (value if isinstance(value, list) else [value])
            )

        def delivered(uids: list[str]) -> bool:
            return {u for u, _ in taken(hook.requests)} >= set(uids)

        def create(prefix: str, n: int) -> list[str]:
            return [
                api.create_event(event_object(object_name=f"{prefix}{i}"))["metadata"]["uid"]
                for i in range(n)
            ]

        hook.fail_matching(refused, 500)
        flag = (
            f"webhook:{hook.url}?mode={mode}&batch_max_events={batch}&batch_max_wait=0.01"
            "&retry_initial_backoff=0.05&retry_max_backoff=0.2"
        )

        def router() -> Router:
            settings = router_settings(api, tmp_path, data_dir=data, shutdown_timeout=1.0)
            return Router(settings, build_specs([flag]))

        first = router()
        async with first.running():
            await until(lambda: first.ready()[0])
            others = create("a", 3)
            await until(lambda: delivered(others))  # the endpoint answered
            x_uid = api.create_event(event_object(name="ev-x", object_name="x"))["metadata"]["uid"]
            others += create("b", 3)
            await until(lambda: router_aside(first) == {(x_uid, 1)} and delivered(others))
            api.bump("default", "ev-x")
            api.bump("default", "ev-x")
            others += create("c", 3)
            await until(lambda: delivered(others))
            await until(lambda: router_aside(first) == {(x_uid, 1), (x_uid, 2), (x_uid, 3)})
        assert first.exit_code == 0 and dropped(first) == 0
        restarted = len(hook.requests)

        second = router()
        async with second.running():
            await until(lambda: second.ready()[0])
            others += create("d", 3)
            await until(lambda: delivered(others))  # before: not until the receiver took X/1
            assert any(q.status == 500 for q in hook.requests[restarted:])  # X/1 sent, refused again
            assert not any(u == x_uid for u, _ in taken(hook.requests))
            assert not any((x_uid, n) in carried(q) for q in hook.requests for n in (2, 3))
            hook.fail_matching(None)  # the receiver's bug fixed
            await until(lambda: (x_uid, 3) in taken(hook.requests))
            await second.pipelines[0].wait_idle(5)
        assert second.exit_code == 0 and dropped(second) == 0
    got = taken(hook.requests)
    assert [n for u, n in got if u == x_uid] == [1, 2, 3]
    assert Counter(got) == Counter([(x_uid, 1), (x_uid, 2), (x_uid, 3), *((u, 1) for u in others)])  # once


@pytest.mark.parametrize("batch", [1, 500])
@pytest.mark.parametrize("mode", ["batch", "event"])
async def test_a_second_record_failing_alone_after_one_set_aside_is_set_aside_too_not_retried_in_place_for_ever(
    tmp_path: Path, mode: str, batch: int
) -> None:
    """A quiet cluster: each record goes alone. g0 is taken; X/1 (a receiver's bug answers it 500)
    fails alone twice: set aside. Y/1, another event the receiver fails, goes out next, nothing
    taken in between. X's failures were counted as the endpoint's (``_common``): Y/1 was never set
    aside, but retried in place alone at every attempt; nothing else was sent, so nothing was
    answered again, and g1, Y/2 and g2 waited for ever. Failures explained by records set aside
    no longer count: Y/1 is set aside as X/1 was, Y/2 held behind it."""
    g0, g1, g2 = (make_occurrence(object_name=name) for name in ("g0", "g1", "g2"))
    x1 = make_occurrence(object_name="x", message="poison x")
    y1 = make_occurrence(object_name="y", count=1, message="poison y")
    y2 = make_occurrence(uid=y1.uid, object_name="y", count=2, message="y again")
    metrics = Metrics()
    knobs: dict[str, Any] = {
        "batch_max_events": batch,
        "retry_initial_backoff": 0.2,
        "retry_max_backoff": 0.5,
    }
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: b"poison" in body, 500)
        async with engine({"url": hook.url, "mode": mode}, metrics, tmp_path / "dead", **knobs) as (
            pipeline,
            sink,
        ):
            pipeline.offer(g0)
            await until(lambda: count(metrics.delivered, NAME) == 1)
            pipeline.offer(x1)
            await until(lambda: aside(pipeline) == {(x1.uid, 1)})
            pipeline.offer(y1)
            await until(lambda: any((y1.uid, 1) in carried(q) for q in hook.requests))  # alone
            for occ in (g1, y2, g2):
                pipeline.offer(occ)
            await until(lambda: count(metrics.delivered, NAME) == 3, timeout=5)  # before: never
            assert taken(hook.requests) == keys([g0, g1, g2])
            await until(lambda: (y1.uid, 1) in aside(pipeline))
            assert (y1.uid, 1) in sink.set_aside()
            hook.fail_matching(None)  # the receiver's bug fixed
            await until(lambda: count(metrics.delivered, NAME) == 6)
    got = taken(hook.requests)
    assert Counter(got) == Counter(keys([g0, x1, y1, y2, g1, g2]))  # each once
    assert [n for u, n in got if u == y1.uid] == [1, 2]
    assert sink.set_aside() == {(x1.uid, 1), (y1.uid, 1)}
    assert count(metrics.dead_lettered, NAME, "rejected") == 0


@pytest.mark.parametrize("mode", ["batch", "event"])
async def test_two_events_set_aside_at_a_stop_are_set_aside_again_after_the_restart_and_hold_up_nothing(
    api: FakeApiServer, tmp_path: Path, mode: str
) -> None:
    """As item 201's restart test, with two events the receiver fails (X0/1, X1/1; X1/2 and X1/3
    held behind X1/1), each set aside in turn with a good event taken after it. After the restart
    the first batch holds only their records, both keys known from the data dir. X0/1 went alone
    first and failed; with no other event left, X1/1 was its probe, and its failure was read as
    the endpoint failing everything: all retried in place, the same at every attempt, and the new
    events waited for ever. A probe set aside before fails by itself: both are set aside again, the
    new events go in, and once the receiver takes them X0's and X1's occurrences go in in order."""
    data = tmp_path / "data"
    bad: set[str] = set()
    async with WebhookReceiver() as hook:

        def refused(body: bytes) -> bool:
            value = orjson.loads(body)
            return any(
                r["uid"] in bad and r["occurrence"] == 1
                for r in (value if isinstance(value, list) else [value])
            )

        def delivered(uids: list[str]) -> bool:
            return {u for u, _ in taken(hook.requests)} >= set(uids)

        def sent(key: tuple[str, int]) -> int:
            return sum(key in carried(q) for q in hook.requests)

        def create(prefix: str, n: int) -> list[str]:
            return [
                api.create_event(event_object(object_name=f"{prefix}{i}"))["metadata"]["uid"]
                for i in range(n)
            ]

        hook.fail_matching(refused, 500)
        # A second at least between two sends of a record set aside: X1 fresh never meets X0 due
        # (a record set aside beside a fresh one the receiver fails too is retried in place).
        flag = (
            f"webhook:{hook.url}?mode={mode}&batch_max_events=20&batch_max_wait=0.01"
            "&retry_initial_backoff=1&retry_max_backoff=2"
        )

        def router() -> Router:
            settings = router_settings(api, tmp_path, data_dir=data, shutdown_timeout=1.0)
            return Router(settings, build_specs([flag]))

        first = router()
        async with first.running():
            await until(lambda: first.ready()[0])
            others = create("a", 3)
            await until(lambda: delivered(others))  # the endpoint answered
            x0 = api.create_event(event_object(name="ev-x0", object_name="x0"))["metadata"]["uid"]
            bad.add(x0)
            await until(lambda: router_aside(first) == {(x0, 1)})
            tries = sent((x0, 1))
            await until(lambda: sent((x0, 1)) > tries)  # X0/1 came due and failed: not due for a second
            others += create("b", 1)
            await until(lambda: delivered(others))  # answered since
            x1 = api.create_event(event_object(name="ev-x1", object_name="x1"))["metadata"]["uid"]
            bad.add(x1)
            await until(lambda: router_aside(first) == {(x0, 1), (x1, 1)})
            api.bump("default", "ev-x1")
            api.bump("default", "ev-x1")
            others += create("c", 1)
            await until(lambda: delivered(others))
            await until(lambda: router_aside(first) == {(x0, 1), (x1, 1), (x1, 2), (x1, 3)})
        assert first.exit_code == 0 and dropped(first) == 0
        restarted = len(hook.requests)

        second = router()
        async with second.running():
            await until(lambda: second.ready()[0])
            await until(lambda: len(hook.requests) > restarted)  # the first batch: X0's and X1's only
            others += create("d", 3)
            await until(lambda: delivered(others), timeout=5)  # before: never
            await until(lambda: {(x0, 1), (x1, 1)} <= router_aside(second))  # set aside again
            after = hook.requests[restarted:]
            assert {q.status for q in after if (x0, 1) in carried(q) or (x1, 1) in carried(q)} == {500}
            assert not any(u in bad for u, _ in taken(hook.requests))
            assert not any((x1, n) in carried(q) for q in hook.requests for n in (2, 3))
            hook.fail_matching(None)  # the receiver's bug fixed
            await until(lambda: {(x0, 1), (x1, 3)} <= set(taken(hook.requests)))
            await second.pipelines[0].wait_idle(5)
        assert second.exit_code == 0 and dropped(second) == 0
    got = taken(hook.requests)
    assert [n for u, n in got if u == x1] == [1, 2, 3]
    assert Counter(got) == Counter([(x0, 1), (x1, 1), (x1, 2), (x1, 3), *((u, 1) for u in others)])  # once


async def test_the_key_of_a_record_set_aside_then_dead_lettered_leaves_the_sink_and_its_data_dir(
    tmp_path: Path,
) -> None:
    """``retry_max_attempts=2``: X/1 (a receiver's bug answers it 500) is set aside, comes due, fails
    again and is dead-lettered. The sink had no ``given_up``: X/1's key stayed in its memory and in
    ``webhook-set-aside.json`` for good (through restarts, up to 4,096 keys rewritten whole at each
    change), though the record is never sent again. Now it goes at once, the file with it."""
    folder = tmp_path / "sink"
    folder.mkdir()
    path = folder / "webhook-set-aside.json"
    x1 = make_occurrence(object_name="x", message="poison pill")
    g0, g1 = (make_occurrence(object_name=name) for name in ("g0", "g1"))
    metrics = Metrics()
    # X/1 waits 0.3 s aside between its two attempts: time to see its key kept.
    knobs: dict[str, Any] = {
        "batch_max_events": 1,
        "retry_max_attempts": 2,
        "retry_initial_backoff": 0.3,
        "retry_max_backoff": 0.3,
    }
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: b"poison" in body, 500)
        async with engine({"url": hook.url}, metrics, tmp_path / "dead", folder, **knobs) as (pipeline, sink):
            pipeline.offer(g0)
            await until(lambda: count(metrics.delivered, NAME) == 1)
            pipeline.offer(x1)
            await until(lambda: path.exists() and orjson.loads(path.read_bytes()) == [x1.key])  # set aside
            await until(lambda: count(metrics.dead_lettered, NAME, "retries_exhausted") == 1)
            assert x1.key not in sink._failing
            assert not path.exists()  # before: it held X/1's key for good
            pipeline.offer(g1)
            await until(lambda: count(metrics.delivered, NAME) == 2)
    assert taken(hook.requests) == keys([g0, g1])
    assert sink.set_aside() == {(x1.uid, 1)}
    assert not path.exists()


async def test_a_key_given_up_before_the_first_start_is_not_read_back_from_the_data_dir(
    tmp_path: Path,
) -> None:
    """The engine may give records up before the sink's first start succeeds (the spool drops its
    head, the records set aside before a restart, while ``start`` fails: a template file not there
    yet). ``given_up`` then removed nothing, as nothing was read yet, and the start read X/1's key
    back from ``webhook-set-aside.json``, where it stayed (up to 4,096 keys, oldest first)."""
    folder = tmp_path / "sink"
    folder.mkdir()
    path = folder / "webhook-set-aside.json"
    x1, y1 = (make_occurrence(object_name=name) for name in ("x", "y"))
    path.write_bytes(orjson.dumps([x1.key, y1.key]))  # both set aside before the restart
    sink = WebhookSink(
        WebhookOptions.model_validate({"url": "http://127.0.0.1:9/hook"}),
        SinkContext(NAME, "t", folder, LOG),
    )
    sink.given_up([x1])  # X/1 dropped for the spool's bound, before any start
    await sink.start()
    try:
        assert list(sink._failing) == [y1.key]  # before: X/1's key came back too
        assert orjson.loads(path.read_bytes()) == [y1.key]
    finally:
        await sink.aclose()
