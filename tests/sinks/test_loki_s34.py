"""Loki: session 34's review (item 278), against the project's Loki receiver.

- ``check`` only read ``/ready``, which Loki serves outside its tenant and auth middleware: a
  multi-tenant Loki without ``tenant``, or a URL whose push path takes no push, passed it, and ``run``
  retried every push for ever. It now sends a push of one stream without entries (204, nothing stored).
- The label-set cache kept whole values of fields in its key but in no label (``type`` when it is not
  a label): 4,096 Events with a 1 MiB ``type`` were held until the cache filled.
- A stream-limit 429's Retry-After, uncapped, kept an entry's aside record, and with it the stream's
  newer entries, held back for as long as the header said (the engine waits at most retry_wait_max).
- After Loki refused one stream of a push, the others were pushed again at once; a stream spanning over
  max_behind had its older entries, stored by the first push, refused as too far behind, and sent again
  stamped at receipt: a second copy in Loki.
- ``timeout=inf`` (and the other float options) passed validation and failed later, naming nothing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
import orjson
import pytest

from eventrouter import OK, Occurrence, Outcome, OutcomeKind, SinkContext, SinkError
from eventrouter.config import ConfigError, build_specs
from eventrouter.record import normalise
from eventrouter.testing import event_object, make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver, format_labels
from eventrouter_sinks.loki import LokiOptions, LokiSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))
PUSH = "/loki/api/v1/push"


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, **kwargs)


def _sink(url: str, context: SinkContext = CONTEXT, **options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), context)


def _only(outcomes: Sequence[Outcome] | None) -> Outcome:
    """The outcome of a send of one occurrence (None: all OK)."""
    return OK if outcomes is None else outcomes[0]


async def _check_refused(sink: LokiSink) -> str:
    try:
        with pytest.raises(SinkError) as info:
            await sink.check()
    finally:
        await sink.aclose()
    return str(info.value)


# ---- F1: check pushes ---------------------------------------------------------------------------


async def test_the_receiver_answers_a_push_of_no_stream_422_and_of_streams_without_entries_204() -> None:
    """Loki's contract for check's push: tenancy first (401 "no org id"); a push of no stream 422
    (Loki 3.4+, ``PushWithResolver``); a stream without entries skipped by the distributor, its labels
    parsed all the same: 204, nothing stored, no stream created (the stream limit is not touched)."""
    empty_stream = {"streams": [{"stream": {"source": "eventrouter"}, "values": []}]}
    answers: list[tuple[int, str]] = []
    async with LokiReceiver(auth_enabled=True, max_streams=0) as loki, aiohttp.ClientSession() as http:
        for body, tenant in (
            (empty_stream, None),
            ({"streams": []}, "ops"),
            (empty_stream, "ops"),
            ({"streams": [{"stream": {"1bad": "x"}, "values": []}]}, "ops"),
        ):
            headers = {"X-Scope-OrgID": tenant} if tenant else {}
            async with http.post(loki.url + PUSH, json=body, headers=headers) as response:
                answers.append((response.status, (await response.text()).strip()))
        assert loki.entries == [] and loki.stream_limited == 0
    assert answers[:3] == [
        (401, "no org id"),
        (422, "error at least one valid stream is required for ingestion"),
        (204, ""),
    ]
    assert answers[3][0] == 400 and answers[3][1].startswith("couldn't parse labels")


@pytest.mark.parametrize(
    "options",
    [{}, {"format": "json"}, {"format": "json", "gzip": "true"}],
    ids=["protobuf", "json", "json-gzip"],
)
async def test_check_fails_for_a_multi_tenant_loki_without_tenant(options: dict[str, Any]) -> None:
    """Loki with auth_enabled (the grafana/loki chart's default) and no ``tenant``: check named
    nothing wrong, and every push of ``run`` was answered 401 "no org id". With the tenant, check
    passes, its push answered 204 in the sink's own format, and nothing is stored."""
    async with LokiReceiver(auth_enabled=True) as loki:
        message = await _check_refused(_sink(loki.url, **options))
        assert message == (
            f"loki: POST {loki.url}{PUSH} (a push of no entries, as check sends) answered 401 'no org id': "
            "this Loki is multi-tenant: set tenant=<org id>"
        )
        sink = _sink(loki.url, tenant="ops", **options)
        try:
            await sink.check()
        finally:
            await sink.aclose()
        probe = loki.pushes[-1]
        assert (probe.status, probe.headers.get("X-Scope-OrgID")) == (204, "ops")
        assert probe.content_type == ("application/json" if options else "application/x-protobuf")
        assert probe.content_encoding == ("gzip" if "gzip" in options else "")
        assert loki.entries == []


@pytest.mark.parametrize(
    ("status", "answer", "says"),
    [
        (404, "404 page not found", "nothing there takes Loki's pushes"),
        (405, "Method Not Allowed", "nothing there takes Loki's pushes"),
        (403, "forbidden: no push for this token", "our credentials are refused"),
    ],
    ids=["404", "405", "403"],
)
async def test_check_fails_naming_the_push_url_when_the_push_path_refuses_every_push(
    status: int, answer: str, says: str
) -> None:
    """``/ready`` answers, the push path does not take pushes (a read target, a gateway route
    without POST, credentials only the write path checks): check names the push URL and what to do."""
    async with LokiReceiver() as loki:
        loki.fail_next(status, message=answer)
        message = await _check_refused(_sink(loki.url, tenant="ops"))
        assert message.startswith(
            f"loki: POST {loki.url}{PUSH} (a push of no entries, as check sends) answered {status} {answer!r}"
        )
        assert says in message
        assert loki.entries == []


async def test_check_passes_and_logs_a_loki_that_answers_its_push_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A passing failure (a distributor restarting) is no reason to refuse the configuration: logged."""
    caplog.set_level(logging.WARNING)
    async with LokiReceiver() as loki:
        loki.fail_next(503, message="no healthy ingesters")
        sink = _sink(loki.url)
        try:
            await sink.check()
        finally:
            await sink.aclose()
    assert "(a push of no entries) answered 503 'no healthy ingesters'; pushing anyway" in caplog.text


# ---- F2: the label-set cache holds no long value ------------------------------------------------


async def test_a_long_value_outside_the_labels_is_not_cached() -> None:
    """``type`` is in the cache's key (the fallback label) though not a label here: ten Events with a
    100 KiB ``type`` were ten cache entries holding 1 MiB. Not cached now; the labels are the same."""
    async with LokiReceiver() as loki:
        sink = _sink(loki.url, default_labels="namespace")
        try:
            batch = [
                normalise(
                    event_object(object_name=f"o{i}", type=f"{i:03d}" + "W" * 100 * 1024), cluster="test"
                )
                for i in range(10)
            ]
            outcomes = await sink.send(batch)
            assert len(sink._label_cache) == 0
            short = await sink.send([make_occurrence(object_name="short")])
            assert short is None or [o.kind for o in short] == [OutcomeKind.OK]
            assert len(sink._label_cache) == 1  # a short one still is
        finally:
            await sink.aclose()
        assert outcomes is None or all(o.kind is OutcomeKind.OK for o in outcomes)
        assert {e.labels for e in loki.entries} == {(("namespace", "default"),)}
        assert len(loki.entries) == 11


# ---- F3: a huge Retry-After holds a stream no longer than the engine waits -------------------------


async def test_a_huge_retry_after_holds_the_stream_no_longer_than_the_engine_waits() -> None:
    """Entry A (45 min old) refused for the stream limit with ``Retry-After: 1000000000``; the engine
    waits at most retry_wait_max and gives A up (not offered again). B, of A's stream and now, was held
    back for the header's 31 years (no attempt, never dead-lettered); now for stream_hold plus
    retry_wait_max at most, then pushed and stored."""
    context = SinkContext(
        name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"), retry_wait_max=0.5
    )
    labels = (
        ("cluster", "test"),
        ("kind", "Pod"),
        ("namespace", "default"),
        ("reason", "BackOff"),
        ("reporting_component", "kubelet"),
        ("service_name", "unknown_service"),
        ("type", "Warning"),
    )
    async with LokiReceiver() as loki:
        sink = _sink(loki.url, context)
        try:
            loki.fail_next(
                429,
                retry_after="1000000000",
                message=f"Maximum active stream limit exceeded when trying to create stream "
                f"{format_labels(labels)}, reduce the number of active streams (reduce labels or reduce "
                "label values), or contact your Loki administrator to see if the limit can be increased, "
                "user: 'fake'",
            )
            a = _only(await sink.send([_at(2700, object_name="a")]))
            assert a.kind is OutcomeKind.RETRY and a.defer
            b = make_occurrence(object_name="b")
            async with asyncio.timeout(10):
                while (outcome := _only(await sink.send([b]))).kind is OutcomeKind.RETRY:
                    assert outcome.held  # held back behind A's record, not sent
                    await asyncio.sleep(0.05)
        finally:
            await sink.aclose()
        assert [orjson.loads(e.line)["involved_object"]["name"] for e in loki.entries] == ["b"]


# ---- F4: streams pushed again after another stream's refusal keep one copy ------------------------


async def _deliver(
    sink: LokiSink, batch: Sequence[Occurrence], between: Callable[[], None] = lambda: None
) -> dict[tuple[str, int], Outcome | None]:
    """Send, then send again what is answered retry (as the engine does, at once here), until
    nothing is: each occurrence's final outcome."""
    pending = list(batch)
    final: dict[tuple[str, int], Outcome | None] = {}
    for _ in range(6):
        if not pending:
            break
        outcomes: Sequence[Outcome | None] = (await sink.send(pending)) or [None] * len(pending)
        again = []
        for occurrence, outcome in zip(pending, outcomes, strict=True):
            if outcome is not None and outcome.kind is OutcomeKind.RETRY:
                again.append(occurrence)
            else:
                final[occurrence.uid, occurrence.number] = outcome
        pending = again
        between()
    assert not pending, "still retried after 6 sends"
    return final


def _copies(loki: LokiReceiver) -> dict[str, set[int]]:
    """Per involved object, the timestamps Loki holds it at (two: a second copy Loki keeps)."""
    stamps: dict[str, set[int]] = defaultdict(set)
    for entry in loki.entries:
        stamps[orjson.loads(entry.line)["involved_object"]["name"]].add(entry.ts_ns)
    return stamps


@pytest.mark.parametrize("wording", ["3.x", "2.x"])
async def test_streams_pushed_again_after_a_stream_limit_refusal_keep_one_copy(
    wording: Literal["3.x", "2.x"],
) -> None:
    """Stream A taken once (an event 75 min old); then a relist's batch: A's events at -70 min,
    -35 min and now, and one of a new stream N, refused for the stream limit (Loki 3.x names it, 2.x
    does not). A was pushed again at once, and its -70 min entry, stored by the first push, refused as
    too far behind and sent again stamped at receipt: two copies. A spans over max_behind: it goes in a
    push of its own, and every occurrence is stored once."""
    async with LokiReceiver(max_streams=1, stream_limit_wording=wording) as loki:
        sink = _sink(loki.url)

        def lift() -> None:
            loki.max_streams = 10

        try:
            await _deliver(sink, [_at(4500, reason="A", object_name="a0")])
            batch = [
                _at(4200, reason="A", object_name="a1"),
                _at(2100, reason="A", object_name="a2"),
                _at(5, reason="A", object_name="a3"),
                _at(4, reason="N", object_name="n0"),
            ]
            final = await _deliver(sink, batch, lift)
        finally:
            await sink.aclose()
        assert all(o is None or o.kind is OutcomeKind.OK for o in final.values()), final
        assert loki.stream_limited == 1  # N refused once, then stored
        assert {name: len(stamps) for name, stamps in _copies(loki).items()} == {
            "a0": 1,
            "a1": 1,
            "a2": 1,
            "a3": 1,
            "n0": 1,
        }


async def test_a_stream_pushed_with_one_another_writer_refuses_as_behind_keeps_one_copy() -> None:
    """Another writer made stream B's newest now; this sink's batch holds B's entry of 70 min ago
    (refused as too far behind, Loki's answer for the push's last stream) and A's entries spanning
    70 min. A was pushed again at once and its oldest entry stored twice. Now A goes in a push of its
    own; B's entry is sent again stamped at receipt (once), as before."""
    async with LokiReceiver() as loki:
        sink, other = _sink(loki.url), _sink(loki.url)
        try:
            await _deliver(sink, [_at(4500, reason="A", object_name="a0")])
            await _deliver(other, [_at(1, reason="B", object_name="b-now")])
            batch = [
                _at(4200, reason="A", object_name="a1"),
                _at(2100, reason="A", object_name="a2"),
                _at(5, reason="A", object_name="a3"),
                _at(4200, reason="B", object_name="b-old"),
            ]
            final = await _deliver(sink, batch)
        finally:
            await sink.aclose()
            await other.aclose()
        assert all(o is None or o.kind is OutcomeKind.OK for o in final.values()), final
        assert any("entry too far behind" in push.message for push in loki.pushes)  # b-old, once
        assert {name: len(stamps) for name, stamps in _copies(loki).items()} == {
            "a0": 1,
            "a1": 1,
            "a2": 1,
            "a3": 1,
            "b-now": 1,
            "b-old": 1,
        }


async def test_a_spanning_stream_among_known_ones_costs_no_push_more() -> None:
    """A guard (it passes on the code before too): a stream spanning over max_behind goes last in the
    push of the streams Loki holds (its answer is then about it), not in a push of its own, so a
    relist of known streams costs no push more."""
    async with LokiReceiver() as loki:
        sink = _sink(loki.url)
        try:
            await _deliver(sink, [_at(3650, reason=r, object_name=f"{r}0") for r in "ABC"])
            pushes = len(loki.pushes)
            batch = [_at(3640, reason="A", object_name="A1")]
            batch += [_at(age, reason=r, object_name=f"{r}{age}") for r in "ABC" for age in (3000, 5)]
            final = await _deliver(sink, batch)
        finally:
            await sink.aclose()
        assert all(o is None or o.kind is OutcomeKind.OK for o in final.values()), final
        assert [push.status for push in loki.pushes[pushes:]] == [204]
        assert all(len(stamps) == 1 for stamps in _copies(loki).values())


# ---- options: finite seconds ------------------------------------------------------------------


@pytest.mark.parametrize(
    "option", ["timeout=inf", "timeout=1e309", "max_age=inf", "future_grace=1e309", "max_behind=inf"]
)
def test_a_non_finite_number_of_seconds_is_refused_naming_the_option(option: str) -> None:
    """``timeout=inf`` passed ``gt=0`` and every start failed "cannot convert float infinity to
    integer", naming nothing (the others failed building the sink so)."""
    name = option.partition("=")[0]
    with pytest.raises(ConfigError) as info:
        build_specs([f"loki:http://loki:3100?tenant=ops&{option}"])
    assert f"option '{name}': Input should be a finite number" in str(info.value)


# ---- item 289: a stream spanning over max_behind keeps one copy (review r2loki) --------------------


async def _size_of_one_entry(occurrence: Occurrence) -> int:
    """What Loki's per-stream limiter counts of this occurrence's entry (line bytes, no metadata)."""
    async with LokiReceiver() as probe:
        sink = _sink(probe.url)
        try:
            await sink.send([occurrence])
        finally:
            await sink.aclose()
        return len(probe.entries[0].line.encode())


@pytest.mark.parametrize("room", [6, 10], ids=["then-room-for-six", "then-room-for-all"])
@pytest.mark.parametrize("listed", [10, 3], ids=["every-refused-entry-listed", "three-listed"])
async def test_a_spanning_stream_refused_for_its_rate_entry_by_entry_keeps_one_copy(
    listed: int, room: int
) -> None:
    """Loki limiting a stream entry by entry (2.x; 3.x with shard_streams off) stores the oldest
    entries of a push while its bucket lasts (here 6 of 10) and refuses the rest, 429. The sink
    retried the whole stream: e0, 72 min older than the others and stored, was then refused as too
    far behind the newest Loki stored with it, taken for a new entry and stamped anew: two copies
    (``then-room-for-all``); or, the stored ones charged to Loki's bucket again at each retry, the
    stream never got in (``then-room-for-six``). Now one copy each, every occurrence answered OK
    (none dead-lettered), with Loki listing every refused entry or only some of them
    (max_returned_stream_errors)."""
    ages = [4300, 600, 500, 400, 300, 200, 100, 50, 20, 10]
    batch = [_at(age, reason="S", object_name=f"e{i}") for i, age in enumerate(ages)]
    size = await _size_of_one_entry(batch[1])
    async with LokiReceiver(
        per_stream_rate=1,
        per_stream_burst=6 * size + 50,
        per_stream_whole=False,
        max_returned_stream_errors=listed,
    ) as loki:
        sink = _sink(loki.url, per_stream_rate=0)  # no budget of its own: Loki's answers only

        def refill() -> None:
            loki.per_stream_burst = room * size + 50
            loki.refill_stream_rate_limits()

        try:
            final = await _deliver(sink, batch, refill)
        finally:
            await sink.aclose()
        assert loki.pushes[0].status == 429 and loki.pushes[0].accepted == 6  # e0..e5 stored
        assert all(o is None or o.kind is OutcomeKind.OK for o in final.values()), final
        assert {name: len(stamps) for name, stamps in _copies(loki).items()} == {
            f"e{i}": 1 for i in range(10)
        }


async def test_entries_a_whole_stream_refusal_left_out_for_being_behind_are_still_delivered() -> None:
    """A guard (it passes on the code before too): Loki limiting the stream whole (3.x's default)
    stores nothing and lists only the entries it refused for the rate, so one it left out for being
    too far behind another writer's newest is not stored. It must not be taken as stored (lost): it
    is sent again, refused as too far behind, and stamped at receipt, once."""
    async with LokiReceiver(per_stream_rate=1, per_stream_burst=1) as loki:
        sink, other = _sink(loki.url, per_stream_rate=0), _sink(loki.url, per_stream_rate=0)
        try:
            loki.per_stream_burst = 10_000_000
            await _deliver(other, [_at(1, reason="S", object_name="other-now")])
            loki.per_stream_burst = 1
            loki.refill_stream_rate_limits()
            batch = [_at(4200, reason="S", object_name=name) for name in ("x",)]
            batch += [_at(age, reason="S", object_name=f"y{age}") for age in (20, 10)]

            def lift() -> None:
                loki.per_stream_burst = 10_000_000
                loki.refill_stream_rate_limits()

            final = await _deliver(sink, batch, lift)
        finally:
            await sink.aclose()
            await other.aclose()
        first = loki.pushes[1]
        assert first.status == 429 and first.accepted == 0 and "total ignored: 2 out of 3" in first.message
        assert all(o is None or o.kind is OutcomeKind.OK for o in final.values()), final
        assert {name: len(stamps) for name, stamps in _copies(loki).items()} == {
            "other-now": 1,
            "x": 1,
            "y20": 1,
            "y10": 1,
        }


async def test_the_receiver_as_a_distributed_loki_answers_for_the_first_refused_stream() -> None:
    """``distributed``: the streams of a push go to their own ingesters and the distributor answers
    the first refusal, the streams after it stored (one ingester answers for the last stream)."""
    labels = {"cluster": "test", "kind": "Pod", "namespace": "default", "type": "Warning"}
    now = time.time_ns()
    body = {
        "streams": [
            {"stream": {**labels, "reason": "K"}, "values": [[str(now), "k"]]},
            {"stream": {**labels, "reason": "S"}, "values": [[str(now), "s"]]},
        ]
    }
    answers = []
    for distributed in (False, True):
        async with (
            LokiReceiver(max_streams=1, distributed=distributed) as loki,
            aiohttp.ClientSession() as http,
        ):
            async with http.post(loki.url + PUSH, json={"streams": body["streams"][1:]}) as held:
                assert held.status == 204  # S held
            async with http.post(loki.url + PUSH, json=body) as response:
                answers.append((response.status, [e.line for e in loki.entries]))
            if distributed:
                assert "when trying to create stream {" in loki.pushes[-1].message
                assert 'reason="K"' in loki.pushes[-1].message
    assert answers == [(204, ["s", "s"]), (429, ["s", "s"])]


async def test_a_spanning_stream_stored_while_another_stream_is_named_refused_keeps_one_copy() -> None:
    """A distributed Loki answers for the first stream whose ingesters failed: K, which this sink
    pushed within 20 min but Loki forgot, is refused for the stream limit while S, last in the push
    and spanning over max_behind, is stored on other ingesters. S was pushed again at once, its
    entry of 70 min ago refused as too far behind (stored) and stamped anew: two copies. Now it is
    taken as perhaps stored: dead-lettered ("may be stored"), counted, never a second copy."""
    async with LokiReceiver(distributed=True) as loki:
        sink = _sink(loki.url)

        def lift() -> None:
            loki.max_streams = 10

        try:
            await _deliver(
                sink, [_at(4500, reason="S", object_name="s0"), _at(4500, reason="K", object_name="k0")]
            )
            loki.forget_streams(lambda labels: labels["reason"] == "K")
            loki.max_streams = 1
            batch = [
                _at(4200, reason="S", object_name="s1"),
                _at(5, reason="S", object_name="s2"),
                _at(6, reason="K", object_name="k1"),
            ]
            final = await _deliver(sink, batch, lift)
        finally:
            await sink.aclose()
        assert loki.stream_limited == 1  # K refused once, then stored
        s1 = final[batch[0].uid, batch[0].number]
        assert s1 is not None and s1.kind is OutcomeKind.REJECT and "may be stored" in s1.reason
        assert all(o is None or o.kind is OutcomeKind.OK for o in (final[o.uid, o.number] for o in batch[1:]))
        assert {name: len(stamps) for name, stamps in _copies(loki).items()} == {
            "s0": 1,
            "k0": 1,
            "s1": 1,
            "s2": 1,
            "k1": 1,
        }


@pytest.mark.parametrize("streams", [3, 50, 300])
async def test_spanning_known_streams_cost_one_push_each(streams: int) -> None:
    """The cost of keeping a spanning stream from being pushed again for another's sake (item 278)
    is one push per spanning stream: K known streams whose entries span over max_behind take K
    pushes (the first spanning stream last in the push of the others), not 1."""
    async with LokiReceiver() as loki:
        sink = _sink(loki.url)
        names = [f"R{i}" for i in range(streams)]
        try:
            await _deliver(sink, [_at(3650, reason=r, object_name=f"{r}-0") for r in names])
            before = len(loki.pushes)
            spanning = [
                _at(age, reason=r, object_name=f"{r}-{age}") for r in names for age in (3640, 3000, 5)
            ]
            final = await _deliver(sink, spanning)
            assert len(loki.pushes) - before == streams
            before = len(loki.pushes)
            within = [_at(age, reason=r, object_name=f"{r}-{age}") for r in names for age in (3000, 2000, 4)]
            final |= await _deliver(sink, within)
            assert len(loki.pushes) - before == 1
        finally:
            await sink.aclose()
        assert all(o is None or o.kind is OutcomeKind.OK for o in final.values()), final
