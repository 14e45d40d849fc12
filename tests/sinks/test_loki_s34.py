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
